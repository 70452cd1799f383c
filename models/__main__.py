"""python -m models NAME -o FILE.pt2: export a recipe (with a symbolic batch axis, or --static-batch)."""

import argparse

import torch

from . import RECIPES, export

parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
parser.add_argument("name", choices=sorted(RECIPES))
parser.add_argument("-o", "--output", required=True)
parser.add_argument("--batch", type=int, default=2, help="batch of the stored example inputs")
parser.add_argument("--static-batch", action="store_true", help="export the default way: the batch is fixed")
args = parser.parse_args()
torch.export.save(export(args.name, args.batch, args.static_batch), args.output)
print(f"wrote {args.output}: {RECIPES[args.name].description}")
