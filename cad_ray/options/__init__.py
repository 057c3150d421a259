"""The option sections of a run config; `cad_ray.config` assembles them and re-exports every name."""
