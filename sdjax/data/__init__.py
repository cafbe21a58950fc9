"""Training data: TFDS array_record builders read through grain, no TensorFlow needed."""

from sdjax.data.image_folder import CaptionedImages
from sdjax.data.pipeline import (
    DataConfig,
    GlobalBatchIterator,
    builder,
    config_section,
    global_batches,
    iterator_restore_args,
    iterator_save_args,
    make_dataset,
    prepare,
    prepare_on_all_hosts,
    preprocess,
    splits,
)
from sdjax.data.shapes import (
    COLOR_NAMES,
    COLOR_VALUES,
    COLORS,
    HELDOUT_COMBOS,
    SHAPES,
    CaptionedShapes,
    caption,
    is_heldout,
    render_shape,
    shapes_config,
)
