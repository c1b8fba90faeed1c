"""python -m training ROOT [options]: train one model (the loop and its options: training/train.py)."""

from training.train import parse_args, train

train(parse_args())
