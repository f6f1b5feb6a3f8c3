"""The names the command line offers and the library accepts. Kept free of torch, so that the
scripts' --help answers at once, and defined once, here, for both."""

DATASETS = ("digits", "cub", "cars", "SOP", "custom")
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101")
UNCERTAINTY_MODES = ("normalized", "relu", "softplus")
BASELINE_LOSSES = ("Proxy_NCA", "MS", "Contrastive", "Triplet", "NPair")  # the Proxy Anchor code's baselines
LOSSES = ("Proxy_Anchor",) + BASELINE_LOSSES
AMP_CHOICES = ("auto", "off", "bf16", "fp16")
SYNTHETIC_LAYOUTS = ("cub", "cars", "sop")  # what scripts/synthetic.py writes
