"""The flags of the tiny training runs that the tests share: a 16-dimensional ResNet-18 from
scratch at 32 px, no loader processes, no wandb, no warm-up; TINY_DIGITS_RUN adds one epoch of
2 steps on the embedded digits without k-means. Written as flag strings, split into lists."""

TINY_MODEL = (
    "--model resnet18 --pretrained none --embedding-size 16 --image-size 32 --workers 0 --wandb disabled --warm 0"
).split()
TINY_DIGITS_RUN = TINY_MODEL + "--dataset digits --epochs 1 --batch-size 32 --max-steps 2 --eval-clustering 0".split()
