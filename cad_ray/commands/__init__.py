"""The `cad-ray` commands, one module per group; `cad_ray.cli` holds the parser that calls them."""
