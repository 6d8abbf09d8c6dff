"""Built-in passes, one per file; importing this package registers them and ``default``."""
from qpipe.ir.passes import register_pipeline
from qpipe.passes import (  # noqa: F401  (each module registers its pass)
    calibrate_data,
    calibrate_noise,
    calibrate_synthetic,
    calibrate_tts,
    eliminate_dead_float,
    fold_bn,
    fuse_requant,
    insert_observers,
    substitute_int_ops,
)

DEFAULT_PIPELINE = (
    "fold-bn,insert-observers,calibrate-synthetic,substitute-int-ops,fuse-requant,eliminate-dead-float"
)
register_pipeline("default", DEFAULT_PIPELINE)
