"""The names of logical axes (what a dimension means) and mesh axes (how devices are arranged)."""

LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert", "vocab", "layers")
MESH_AXES = ("data", "fsdp", "tensor", "expert")
