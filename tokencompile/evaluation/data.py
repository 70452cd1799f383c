"""Evaluation data: image folders, text files (one text per line) and STS-style TSV sentence pairs,
turned into input tuples for a program.

Programs have static token counts, so texts are padded or truncated to the program's own token count
and images are resized to the program's own input size (both read from the program's input shapes).
"""

from __future__ import annotations

import csv
import functools
import math
import os
import re
from dataclasses import dataclass, field, replace

import torch

from ..errors import TokenCompileError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PAIR_EXTENSIONS = (".tsv", ".csv")
SYNSET = re.compile(r"^(n\d{8})_")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocess:
    """How an image becomes a tensor: resize the shorter side to size / crop_pct, center-crop, normalize."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    input_size: tuple[int, int, int] | None = None  # (C, H, W); the program's shape wins when both are known


@dataclass
class EvalData:
    """Samples ready for a program, plus what is known about them.

    ``inputs``: one tensor per program input, all samples stacked on axis 0. For sentence pairs the first
    sentences come first, then the second sentences (2 x pairs samples)."""

    kind: str  # "images" | "texts" | "pairs"
    inputs: tuple[torch.Tensor, ...]
    names: list[str] = field(default_factory=list)
    labels: torch.Tensor | None = None  # class index per image, -1 where unknown
    gold: torch.Tensor | None = None  # gold similarity per pair
    truncated: int = 0  # texts cut to fit the program's token count

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs else 0


# ---------------------------------------------------------------- program input shapes

def program_input_shapes(program) -> list[tuple]:
    """Shapes of the program's user inputs; symbolic sizes (the batch) come back as None."""
    shapes = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            shape = getattr(node.meta.get("val"), "shape", ())
            shapes.append(tuple(size if isinstance(size, int) else None for size in shape))
    return shapes


def program_token_count(program) -> int:
    """The token count of a text program taking (input_ids, attention_mask) of shape (batch, tokens)."""
    shapes = program_input_shapes(program)
    if len(shapes) != 2 or any(len(shape) != 2 for shape in shapes) or shapes[0][1] is None:
        raise TokenCompileError(f"text data needs a program taking (input_ids, attention_mask) of shape "
                                f"(batch, tokens) with a fixed token count; this one takes {shapes}",
                                "give images for a vision model, or export the text model with a fixed length")
    return shapes[0][1]


def program_image_size(program) -> tuple[int, int, int]:
    """(C, H, W) of a vision program taking one (batch, C, H, W) tensor."""
    shapes = program_input_shapes(program)
    if len(shapes) != 1 or len(shapes[0]) != 4 or None in shapes[0][1:]:
        raise TokenCompileError(f"image data needs a program taking one (batch, C, H, W) tensor; this one takes "
                                f"{shapes}", "give text data (a .txt or .tsv file) for a text model")
    return tuple(shapes[0][1:])


# ---------------------------------------------------------------- paths

def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise TokenCompileError(f"no such data path: {path}",
                                "give an image folder, a text file (one text per line) or a .tsv of sentence pairs")


def data_kind(path: str) -> str:
    """"images" for a folder, "pairs" for .tsv / .csv, "texts" for any other file."""
    _check_exists(path)
    if os.path.isdir(path):
        return "images"
    return "pairs" if path.lower().endswith(PAIR_EXTENSIONS) else "texts"


# ---------------------------------------------------------------- images

def image_files(folder: str) -> list[str]:
    """Sorted image files directly inside ``folder``."""
    _check_exists(folder)
    if not os.path.isdir(folder):
        raise TokenCompileError(f"{folder} is not a folder", "give a folder of images")
    entries = sorted(os.listdir(folder))
    if not entries:
        raise TokenCompileError(f"the image folder {folder} is empty", "put .jpg / .png / .JPEG images in it")
    images = [os.path.join(folder, name) for name in entries if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise TokenCompileError(f"no images in {folder} ({len(entries)} other files)",
                                f"put images ({', '.join(IMAGE_EXTENSIONS)}) directly in the folder")
    return images


def preprocess_image(image, size: tuple[int, int], settings: Preprocess) -> torch.Tensor:
    """A PIL image -> normalized (C, H, W) float tensor: resize shorter side, center-crop, normalize."""
    import numpy as np
    from PIL import Image

    modes = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
    if settings.interpolation not in modes:
        raise TokenCompileError(f"unknown interpolation {settings.interpolation!r}",
                                f"choose one of: {', '.join(modes)}")
    height, width = size
    # timm's center-crop convention: scale so the crop is crop_pct of the resized shorter side
    scale = max(height, width) / settings.crop_pct / min(image.size)
    resized = image.convert("RGB").resize((max(width, round(image.size[0] * scale)),
                                           max(height, round(image.size[1] * scale))), modes[settings.interpolation])
    left, top = (resized.size[0] - width) // 2, (resized.size[1] - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(settings.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(settings.std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels - mean) / std


@functools.cache
def _imagenet_synsets() -> dict[str, int]:
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        raise TokenCompileError("file names carry ImageNet synsets, but timm (which has the synset table) is "
                                "not installed", "pip install 'tokencompile[models]', or pass --no-labels") from None
    return {synset: index for index, synset in enumerate(ImageNetInfo().label_names())}


def imagenet_index(synset: str) -> int:
    """Class index of an ImageNet-1k synset (its rank among the 1,000 sorted synsets); -1 if not one of them."""
    return _imagenet_synsets().get(synset, -1)


def image_labels(paths: list[str]) -> torch.Tensor | None:
    """Labels from ImageNet-style ``<synset>_...`` file names (-1 where unknown); None if no name has one."""
    synsets = [SYNSET.match(os.path.basename(path)) for path in paths]
    if not any(synsets):
        return None
    return torch.tensor([imagenet_index(match.group(1)) if match else -1 for match in synsets])


def load_images(folder: str, image_size: tuple[int, int, int], settings: Preprocess | None = None,
                limit: int | None = None, labels: bool = True) -> EvalData:
    """An image folder as one (N, C, H, W) tensor, with labels from synset file names when present."""
    from PIL import Image, UnidentifiedImageError

    settings = settings or Preprocess()
    paths = image_files(folder)[:limit]
    channels, height, width = image_size
    if channels != 3:
        raise TokenCompileError(f"the program takes {channels}-channel images", "only RGB (3-channel) programs "
                                "can read image folders; pass tensors from Python instead")
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(preprocess_image(image, (height, width), settings))
        except (UnidentifiedImageError, OSError) as error:
            raise TokenCompileError(f"cannot read image {path} ({type(error).__name__})",
                                    "remove it from the folder or replace it with a valid image") from None
    names = [os.path.basename(path) for path in paths]
    return EvalData("images", (torch.stack(tensors),), names, image_labels(paths) if labels else None)


def timm_preprocess(name: str) -> Preprocess:
    """Preprocessing from a timm model's pretrained config (no weights are loaded)."""
    try:
        import timm
    except ImportError:
        raise TokenCompileError("timm is not installed", "pip install 'tokencompile[models]'") from None
    try:
        config = timm.create_model(name, pretrained=False).pretrained_cfg
    except Exception as error:  # noqa: BLE001 - timm raises various errors for unknown names
        raise TokenCompileError(f"timm has no model {name!r} ({str(error).splitlines()[0]})",
                                "see timm.list_models()") from None
    return preprocess_from_config(config)


def preprocess_from_config(config: dict) -> Preprocess:
    """Preprocess from a timm-style config dict (input_size, mean, std, crop_pct, interpolation)."""
    defaults = Preprocess()
    return Preprocess(mean=tuple(config.get("mean", defaults.mean)), std=tuple(config.get("std", defaults.std)),
                      crop_pct=float(config.get("crop_pct", defaults.crop_pct)),
                      interpolation=config.get("interpolation", defaults.interpolation) or defaults.interpolation,
                      input_size=tuple(config["input_size"]) if config.get("input_size") else None)


def with_overrides(settings: Preprocess, mean=None, std=None, crop_pct=None, interpolation=None) -> Preprocess:
    """``settings`` with the options given on the command line replacing its values."""
    changes = {key: value for key, value in (("mean", mean), ("std", std), ("crop_pct", crop_pct),
                                             ("interpolation", interpolation)) if value is not None}
    return replace(settings, **changes)


# ---------------------------------------------------------------- texts

def load_tokenizer(directory: str | None):
    """A Hugging Face tokenizer from a local directory (no downloads)."""
    if directory is None:
        raise TokenCompileError("text data needs a tokenizer", "pass --tokenizer DIR (a local Hugging Face "
                                "directory with tokenizer.json or vocab.txt)")
    if not os.path.isdir(directory):
        raise TokenCompileError(f"no such tokenizer directory: {directory}",
                                "pass --tokenizer DIR, a local Hugging Face directory with the tokenizer files")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenCompileError("transformers is not installed", "pip install 'tokencompile[models]'") from None
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds for a bad directory
        raise TokenCompileError(f"cannot load a tokenizer from {directory}: {str(error).splitlines()[0]}",
                                "the directory needs tokenizer.json or vocab.txt and tokenizer_config.json") \
            from None


def _read_lines(path: str) -> list[str]:
    _check_exists(path)
    if os.path.isdir(path):
        raise TokenCompileError(f"{path} is a folder, not a text file", "give a file with one text per line")
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().splitlines()
    except UnicodeDecodeError:
        raise TokenCompileError(f"{path} is not UTF-8 text", "save it as UTF-8, one text per line") from None


def read_texts(path: str, limit: int | None = None) -> list[str]:
    """Non-blank lines of a UTF-8 text file."""
    texts = [line.strip() for line in _read_lines(path) if line.strip()]
    if not texts:
        raise TokenCompileError(f"the text file {path} is empty", "put one text per line in it")
    return texts[:limit]


def _score(text: str, path: str, line: int) -> float:
    try:
        score = float(text)
    except ValueError:
        raise TokenCompileError(f"{path} line {line}: the gold score {text!r} is not a number",
                                "fix or remove the row (a header row is not allowed)") from None
    if not math.isfinite(score):
        raise TokenCompileError(f"{path} line {line}: the gold score is {text!r}", "give a finite number, or "
                                "remove the row")
    return score


def read_pairs(path: str, limit: int | None = None) -> tuple[list[str], list[str], torch.Tensor | None]:
    """Tab-separated sentence pairs: (first, second, gold scores or None).

    Rows are either the STS-benchmark layout (genre, file, year, id, score, sentence 1, sentence 2[, sources])
    or ``sentence 1<TAB>sentence 2[<TAB>score]``; every row must use the same layout."""
    first, second, gold = [], [], []
    layout = None
    with_gold = {7: True, 8: True, 9: True, 3: True, 2: False}
    for number, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        row = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE))
        columns = len(row)
        if columns not in with_gold:
            raise TokenCompileError(f"{path} line {number}: {columns} tab-separated columns",
                                    "give 'sentence1<TAB>sentence2[<TAB>score]' or the STS-benchmark layout "
                                    "(7 columns: genre, file, year, id, score, sentence1, sentence2)")
        kind = "stsb" if columns >= 7 else columns
        if layout is None:
            layout = kind
        elif kind != layout:
            raise TokenCompileError(f"{path} line {number}: {columns} columns, unlike the rows before it",
                                    "use one layout for every row")
        sentences = (row[5], row[6]) if kind == "stsb" else (row[0], row[1])
        if not all(sentence.strip() for sentence in sentences):
            raise TokenCompileError(f"{path} line {number}: an empty sentence", "fix or remove the row")
        first.append(sentences[0])
        second.append(sentences[1])
        if with_gold[columns]:
            gold.append(_score(row[4] if kind == "stsb" else row[2], path, number))
    if not first:
        raise TokenCompileError(f"no sentence pairs in {path}", "put one tab-separated pair per line")
    return first[:limit], second[:limit], torch.tensor(gold[:limit], dtype=torch.float64) if gold else None


def tokenize(tokenizer, texts: list[str], tokens: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    """(input_ids, attention_mask) padded / truncated to ``tokens``, and how many texts were truncated."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    return (encoded["input_ids"], encoded["attention_mask"]), sum(length > tokens for length in lengths)


def load_texts(path: str, tokenizer, tokens: int, limit: int | None = None) -> EvalData:
    texts = read_texts(path, limit)
    inputs, truncated = tokenize(tokenizer, texts, tokens)
    return EvalData("texts", inputs, texts, truncated=truncated)


def load_pairs(path: str, tokenizer, tokens: int, limit: int | None = None) -> EvalData:
    first, second, gold = read_pairs(path, limit)
    inputs, truncated = tokenize(tokenizer, first + second, tokens)
    return EvalData("pairs", inputs, first + second, gold=gold, truncated=truncated)


# ---------------------------------------------------------------- one entry point

def load_data(path: str, program, tokenizer=None, preprocess: Preprocess | None = None,
              limit: int | None = None, labels: bool = True) -> EvalData:
    """Samples for ``program`` from ``path`` (folder: images; .tsv/.csv: sentence pairs; else text lines).

    ``tokenizer``: a tokenizer or a local directory to load one from (text data only)."""
    if limit is not None and limit <= 0:
        raise TokenCompileError(f"--limit {limit} leaves no samples", "give a positive --limit")
    kind = data_kind(path)
    if kind == "images":
        image_files(path)  # an empty folder is a data error before it is a model mismatch
        size = program_image_size(program)
        return load_images(path, size, preprocess, limit, labels)
    tokens = program_token_count(program)
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    return (load_pairs if kind == "pairs" else load_texts)(path, tokenizer, tokens, limit)


def batched(inputs: tuple[torch.Tensor, ...], batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Stacked inputs cut into input tuples of at most ``batch`` samples."""
    total = int(inputs[0].shape[0])
    return [tuple(x[start:start + batch] for x in inputs) for start in range(0, total, batch)]


def load_calibration_inputs(path: str, program, tokenizer=None, preprocess: Preprocess | None = None,
                            limit: int | None = None, batch: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """Input tuples for ``program`` from a data path (for calibration): batches of at most ``batch``."""
    data = load_data(path, program, tokenizer, preprocess, limit, labels=False)
    return batched(data.inputs, batch)


# ---------------------------------------------------------------- command-line helpers

def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(value) for value in values):
        raise TokenCompileError(f"cannot read {what} {text!r}", f"give three numbers, e.g. --{what} 0.5,0.5,0.5")
    return values


def resolve_preprocess(model_spec: str, timm_config: str | None = None, mean: str | None = None,
                       std: str | None = None, crop_pct: float | None = None,
                       interpolation: str | None = None) -> Preprocess:
    """Image preprocessing: from --timm-config NAME or a timm:NAME model, else ImageNet defaults; then the
    values given on the command line."""
    name = timm_config or (model_spec[5:] if model_spec.startswith("timm:") else None)
    base = timm_preprocess(name) if name else Preprocess()
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise TokenCompileError(f"--crop-pct {crop_pct:g} is out of range", "give 0 < crop-pct <= 1, e.g. 0.875")
    std_values = _floats(std, "std")
    if std_values and not all(value > 0 for value in std_values):
        raise TokenCompileError(f"--std {std} has a value that is not positive", "give three positive numbers, "
                                "e.g. --std 0.5,0.5,0.5")
    return with_overrides(base, _floats(mean, "mean"), std_values, crop_pct, interpolation)


def default_tokenizer(model_spec: str, tokenizer: str | None) -> str | None:
    """--tokenizer, or the model's own directory for an hf:DIR model."""
    if tokenizer is None and model_spec.startswith("hf:"):
        return model_spec[3:]
    return tokenizer
