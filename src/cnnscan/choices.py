"""What a user can choose by name (map views, filter modes, colour scales) and the scan's
defaults, in a module that imports nothing heavy: the command line builds its help from
here without importing torch, and the library reads the same names."""

VIEWS = ("heatmap", "grayscale", "colour", "positive", "negative", "signed")
FILTER_MODES = ("auto", "rgb", "channels", "mean")
SCALES = ("shared", "per-map")
DEFAULT_IMAGE = "sample:chelsea"
CLASS_IMAGE_STEPS = 32  # the top-1 class image of a scan: a preview, about a second on a CPU
CONCEPT_METHODS = ("lrp", "gradient_x_activation")  # how concepts' relevance flows back
