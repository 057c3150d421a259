"""Storage: the run root and its Parquet tables, the only interface between stages.

    <root>/_manifest.json                                  config, fingerprint, code version, completion
    <root>/_shards/concept=<c>/objective=<o>/shard-NNNNN.parquet   partial gradient sums (float64), until the pair is reduced
    <root>/scores/concept=<c>/objective=<o>/part-0.parquet  one row per component
    <root>/neurons/concept=<c>/objective=<o>/part-0.parquet one row per output row of each tensor
    <root>/layers/concept=<c>/objective=<o>/part-0.parquet  one row per tensor
    <root>/weights/part-0.parquet                           the scoped weights, once (grad = score / weight)

A root is a local path or `s3://bucket/prefix` (`root.RunRoot`: atomic writes, the one footer check, the
manifest); `tables` says what the tables hold; `scores.ScoreStore` queries them. Plain
`pandas.read_parquet(root + "/scores", filters=[("concept", "==", "seven")])` works on every table.
"""

from cad_ray.store.root import (METADATA_KEY, PART_FILE, ROW_GROUP_SIZE, RUN_KEYS, Footer, RunRoot,  # noqa: F401
                                atomic_local_file, belongs, filesystem, hidden_temporary, is_damage)
from cad_ray.store.scores import ScoreStore  # noqa: F401
from cad_ray.store.tables import (SCORE_SCHEMA, WEIGHT_SCHEMA, aggregate_tables, partition,  # noqa: F401
                                  score_parts, table_metadata, weight_parts)
