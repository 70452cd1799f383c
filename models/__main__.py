"""python -m models NAME -o FILE.pt2: export a recipe (with a symbolic batch axis)."""

import argparse

import torch

from . import RECIPES, export

parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
parser.add_argument("name", choices=sorted(RECIPES))
parser.add_argument("-o", "--output", required=True)
parser.add_argument("--batch", type=int, default=2, help="batch of the stored example inputs")
args = parser.parse_args()
torch.export.save(export(args.name, args.batch), args.output)
print(f"wrote {args.output}: {RECIPES[args.name].description}")
