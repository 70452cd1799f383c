"""Decoder verbs: `generate` (prompt reduced in prefill, greedy decoding, in torch or from exported
graphs), `export-decoder` (prefill + decode ONNX graphs), and the `--task lm` parts of `eval` / `sweep`."""

from __future__ import annotations

import click

from ..errors import TokenCompileError

# the decoder methods that need no pixel inputs (tokencompile.decoder.prefill.METHODS and span_scored.SPAN_SCORES)
CLI_METHODS = ("fastv", "pyramiddrop", "dart", "divprune", "zipcache", "random")
# the methods that reduce a VLM's image tokens before its language model (tokencompile.decoder.vision)
IMAGE_METHODS = ("vtc-cls", "visionzip")
PIXELS = "pixel_values"
# a VLM's language-model inputs (tokencompile.decoder.vlm.EMBEDS / POSITIONS, named here to keep torch out
# of the CLI's start-up): embeddings with its images merged in [B, N, C], multimodal rotary positions [B, axes, N]
EMBEDS, POSITIONS = "inputs_embeds", "position_ids"
TOKEN_AXIS = {EMBEDS: -2, POSITIONS: -1}  # their token axes


def _number_list(text: str, option: str, convert=int) -> tuple:
    from ..evaluation.sweep import parse_list

    return tuple(parse_list(text, convert, option))


def load_causal_lm(model_dir: str, gguf_file: str | None):
    """A local Hugging Face causal LM (fp32, SDPA) and its tokenizer (None if the directory has none)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(model_dir):
        raise TokenCompileError(f"{model_dir} is not a directory", "give a local Hugging Face model directory")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32,
                                                 **extra).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **extra)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def vision_language_kind(model_dir: str, gguf_file: str | None) -> str | None:
    """The model type of the vision-language model in MODEL_DIR (its config has a vision tower), else None."""
    if gguf_file:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None
    return config.model_type if getattr(config, "vision_config", None) is not None else None


def load_decoder_model(model_dir: str, gguf_file: str | None, tokenizer_dir: str | None, images: bool):
    """(model, tokenizer, processor or None) of MODEL_DIR: a vision-language model with its processor (from
    ``tokenizer_dir`` if given; without --image a tokenizer will do), else a causal LM with its tokenizer.
    ``images``: --image was given."""
    import torch

    kind = vision_language_kind(model_dir, gguf_file)
    if images and kind is None:
        raise TokenCompileError(f"{model_dir} is not a vision-language model", "drop --image")
    if kind is None:
        model, tokenizer = load_causal_lm(model_dir, gguf_file)
        return model, _load_tokenizer(tokenizer_dir, gguf_file) if tokenizer_dir else tokenizer, None
    from transformers import AutoModelForImageTextToText

    try:
        processor = _load_processor(tokenizer_dir or model_dir)
    except TokenCompileError:
        if images:
            raise
        processor = None  # text prompts: the tokenizer is enough
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation="sdpa",
                                                            dtype=torch.float32).eval()
    except (OSError, ValueError) as error:
        raise TokenCompileError(f"cannot load the {kind} model in {model_dir}: {str(error).splitlines()[0]}",
                                "give a Hugging Face image-text-to-text model folder with its weights") from None
    if processor is not None:
        return model, processor.tokenizer, processor
    try:
        return model, _load_tokenizer(tokenizer_dir or model_dir, None), None
    except TokenCompileError:
        return model, None, None  # --prompt-ids needs none


def _load_processor(folder: str):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as error:
        processor, reason = None, str(error).splitlines()[0]
    if processor is None or not hasattr(processor, "image_processor"):
        raise TokenCompileError(f"cannot load an image processor from {folder}"
                                f"{': ' + reason if processor is None else ''}",
                                "give the vision-language model's folder, with its processor saved in it")
    return processor


def _image_prompts(processor, prompts: tuple[str, ...], images: tuple[str, ...], chat: bool, length: int | None = None,
                   model=None, merged: bool = False):
    """(input_ids [B, N], attention mask or None, extra inputs) of prompts, each with its image: the image
    placeholders go first unless the prompt holds them (with ``chat``: the user turn of the chat
    template, image first). Prompts of different lengths (or shorter than ``length``) are padded on the
    left. The extra inputs are the pixel_values, or, when the processor gives more (LLaVA-NeXT's
    image_sizes) or with ``merged``, each prompt's language-model inputs, its image merged in by ``model``
    (embeddings, and the positions of multimodal RoPE; ``tokencompile.decoder.vlm.language_model_inputs``)."""
    import torch
    from PIL import Image, UnidentifiedImageError

    if len(images) != len(prompts):
        raise TokenCompileError(f"{len(prompts)} --prompt and {len(images)} --image options",
                                "give one --image for each --prompt")
    placeholder = getattr(processor, "image_token", "<image>")
    encoded = []
    for prompt, path in zip(prompts, images):
        try:
            with Image.open(path) as file:
                picture = file.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise TokenCompileError(f"cannot read the image {path} ({str(error).splitlines()[0]})",
                                    "give a JPEG or PNG file") from None
        if chat:
            if not getattr(processor, "chat_template", None):
                raise TokenCompileError("the processor has no chat template", "drop --chat")
            content = [{"type": "text", "text": prompt}]
            turn = [{"role": "user", "content": content if placeholder in prompt else [{"type": "image"}, *content]}]
            text = processor.apply_chat_template(turn, add_generation_prompt=True)
        else:
            text = prompt if placeholder in prompt else f"{placeholder}\n{prompt}"
        # a chat template writes its own special tokens (e.g. BOS)
        encoded.append(processor(images=picture, text=text, return_tensors="pt", add_special_tokens=not chat))
    rows = [e.input_ids[0] for e in encoded]
    if len({len(row) for row in rows}) == 1 and length in (None, len(rows[0])):
        ids, mask = torch.stack(rows), None
    else:
        ids, mask = _pad_left(rows, processor.tokenizer, length)
    others = sorted(set(encoded[0]) - {"input_ids", "attention_mask", PIXELS})
    if not others and not merged:
        return ids, mask, {PIXELS: torch.cat([e[PIXELS] for e in encoded])}
    if model is None:
        raise TokenCompileError(f"the processor gives {', '.join(others)} besides pixel_values, which the "
                                "exported graphs do not take", "give the processor of the model it was exported "
                                "from (--tokenizer)")
    return ids, mask, _embedded_prompts(model, encoded, ids.shape[1])


def _embedded_prompts(model, encoded: list, length: int) -> dict:
    """Each prompt's language-model inputs (its image merged in, computed alone; ``language_model_inputs``),
    padded on the left to ``length`` (the token axis: -2 of the embeddings, -1 of the positions)."""
    from .vlm import language_model_inputs

    rows = [language_model_inputs(model, e.input_ids, **{k: v for k, v in e.items() if k != "input_ids"})
            for e in encoded]
    batch = {}
    for name in rows[0]:
        axis = TOKEN_AXIS[name]
        shape = [len(rows), *rows[0][name].shape[1:]]
        shape[axis] = length
        batch[name] = rows[0][name].new_zeros(shape)
        for index, row in enumerate(rows):
            tokens = row[name].shape[axis]
            batch[name][index].narrow(axis, length - tokens, tokens).copy_(row[name][0])
    return batch


REDUCTION_DEFAULTS = {"method": "fastv", "method_options": (), "budget": None, "keep": None, "layer": None, "sinks": 0,
                      "pool": 1, "span": None, "image_token_id": None, "positions": "keep", "lookup": 0, "ahead": 64,
                      "probes": 1}


def _compile_options(command):
    """Options that choose the prompt reduction (shared by `generate` and `export-decoder`)."""
    options = [
        click.option("--gguf-file", help="GGUF checkpoint inside MODEL_DIR (dequantised to fp32)."),
        click.option("--method", type=click.Choice(CLI_METHODS + IMAGE_METHODS), default="fastv", show_default=True,
                     help="fastv: one stage; pyramiddrop: several; dart, divprune, zipcache, random: their score "
                     "on the span, FastV's stages; vtc-cls, visionzip: a VLM's image tokens, reduced before its "
                     "language model (with --image)."),
        click.option("--option", "method_options", multiple=True, metavar="KEY=VALUE",
                     help="An option of dart, divprune, zipcache or random (repeatable), e.g. pivots=4."),
        click.option("--budget", type=float, help="Prefill FLOPs ratio to meet (0 < B <= 1)."),
        click.option("--keep", help="Fraction of the span kept (instead of --budget); pyramiddrop: one per stage, "
                     "comma-separated, or one ratio each stage keeps of what reached it."),
        click.option("--layer", help="First layer that sees the kept tokens (fastv; default: 'auto' with --budget, "
                     "the deepest whose full-width layers cost a quarter of the budget; 2 with --keep), or the "
                     "stage layers (pyramiddrop, e.g. 8,16,24)."),
        click.option("--sinks", type=int, default=0, show_default=True, help="First prompt tokens never removed."),
        click.option("--pool", type=int, default=1, show_default=True,
                     help="Average each score over this many neighbours (odd)."),
        click.option("--span", help="START,LENGTH of the prompt tokens that may go (default: all but the last)."),
        click.option("--image-token-id", type=int, help="The span is every token with this id (VLM image tokens; "
                     "with --image the default is the model's image placeholder)."),
        click.option("--positions", type=click.Choice(["keep", "renumber"]), default="keep", show_default=True),
        click.option("--lookup", type=int, default=0, show_default=True,
                     help="Rank first the span tokens that follow earlier occurrences of the n-grams at the last "
                     "N prompt tokens (for continuations that copy the prompt; 16 recommended)."),
        click.option("--ahead", type=int, default=64, show_default=True,
                     help="How many tokens past the prompt a --lookup match reaches."),
        click.option("--probes", type=int, default=1, show_default=True,
                     help="Score by the mean attention row of the last P prompt tokens (1: FastV's last token)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _region(span: str | None, image_token_id: int | None):
    from . import Span

    if image_token_id is not None:
        return Span(token_id=image_token_id)
    if span is None:
        return Span()
    values = _number_list(span, "--span")
    if len(values) != 2:
        raise TokenCompileError(f"--span {span!r} is not START,LENGTH", "give --span START,LENGTH")
    return Span(*values)


def _prompt(tokenizer, prompt: str | None, prompt_ids: str | None, where: str, chat: bool = False):
    """[1, N] ids of the prompt text (with ``chat``: as the user turn of the tokenizer's chat template,
    ending where the assistant's answer begins) or of the given ids."""
    import torch

    if prompt is not None:
        if tokenizer is None:
            raise TokenCompileError(f"{where} has no tokenizer", "give --tokenizer DIR or --prompt-ids")
        if not chat:
            return tokenizer(prompt, return_tensors="pt").input_ids
        if not getattr(tokenizer, "chat_template", None):
            raise TokenCompileError(f"the tokenizer of {where} has no chat template", "drop --chat")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_dict=True, return_tensors="pt")["input_ids"]
    if chat:
        raise TokenCompileError("--chat formats prompt text; --prompt-ids are given as they are",
                                "give --prompt with --chat, or drop --chat")
    return torch.tensor([_number_list(prompt_ids, "--prompt-ids")])


def _padded_prompts(tokenizer, prompts: tuple[str, ...], where: str, length: int | None = None, chat: bool = False):
    """Several prompts as one batch padded on the left to ``length`` (default: the longest): (ids, mask)."""
    return _pad_left([_prompt(tokenizer, text, None, where, chat)[0] for text in prompts], tokenizer, length)


def _pad_left(rows: list, tokenizer, length: int | None = None):
    """Token rows as one batch padded on the left to ``length`` (default: the longest): (ids, mask)."""
    import torch

    longest = max(len(row) for row in rows)
    length = longest if length is None else length
    if longest > length:
        raise TokenCompileError(f"a prompt has {longest} tokens, more than the {length} the decoder was exported "
                                "for", "shorten it, or export again for longer prompts")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
    ids = torch.full((len(rows), length), 0 if pad is None else pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, length - len(row):], mask[index, length - len(row):] = row, 1
    return ids, mask


def _replace_all(text: str, names: dict) -> str:
    for name, flag in names.items():
        text = text.replace(name, flag)
    return text


def _numbers(text: str | None, option: str, convert):
    """None, one number, or a tuple of comma-separated numbers."""
    if text is None:
        return None
    values = _number_list(text, option, convert)
    return values[0] if len(values) == 1 else values


def _read_slots(caches) -> list:
    """Keys, values (zero where a layer's key mask hides padding) and key masks of per-layer caches."""
    import torch

    flat = []
    for layer in caches:
        seen = layer[2][:, None, :, None].to(layer[0].dtype) if len(layer) == 3 else 1
        flat += [layer[0] * seen, layer[1] * seen]
    return flat + [torch.as_tensor(layer[2]).float() for layer in caches if len(layer) == 3]


def _until_eos(tokens: list[int], eos) -> list[int]:
    """A batch row's new tokens up to its first end-of-sequence token (included); the batch runs on until
    every row has one."""
    stops = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index + 1]
    return tokens


def _left_padded(ids, count: int, keep_id: int | None) -> tuple:
    """A [1, N] prompt shortened by ``count`` tokens (the first after the first token that are not
    ``keep_id``, an image placeholder: each prompt holds all of them; at most half of those) and padded
    on the left (with id 0), with the mask of a batch of it after an unpadded prompt ([2, N]) and, per
    column, the index of the prompt token it holds (-1: padding)."""
    import torch

    row = ids[0]
    droppable = (row != keep_id) if keep_id is not None else torch.ones_like(row, dtype=torch.bool)
    droppable[0] = False  # the first token (BOS) stays, and at most half of the others go
    dropped = droppable.nonzero()[:min(count, int(droppable.sum()) // 2), 0]
    kept = torch.ones_like(droppable)
    kept[dropped] = False
    mask = torch.ones(2, row.shape[0], dtype=torch.long)
    mask[1, :len(dropped)] = 0
    columns = torch.cat([torch.full_like(dropped, -1), kept.nonzero()[:, 0]])
    return torch.where(columns >= 0, row[columns.clamp(min=0)], 0)[None], mask, columns


def _compile(model, ids, reduction: dict, padding: bool = False, extra: dict | None = None):
    """``compile_decoder`` with the reduction options of ``_compile_options`` as the CLI gives them
    (``extra``: a VLM's pixel_values; the span defaults to its image placeholders)."""
    from ..cli import _parse_options
    from . import compile_decoder

    options = dict(reduction)
    if options["method"] in IMAGE_METHODS and not extra:
        raise TokenCompileError(f"--method {options['method']} reduces a VLM's image tokens",
                                "give a vision-language model folder and --image FILE")
    if extra and options["span"] is None and options["image_token_id"] is None:
        options["image_token_id"] = getattr(model.config, "image_token_id", None)
        if options["image_token_id"] is None:
            raise TokenCompileError(f"the {model.config.model_type} config names no image_token_id",
                                    "give --image-token-id ID (or --span START:LEN)")
    keep = _numbers(options.pop("keep"), "--keep", float)
    layer = options.pop("layer")
    layer = layer if layer == "auto" else _numbers(layer, "--layer", int)
    budget = options.pop("budget")
    if budget is None and keep is None and options["method"] != "pyramiddrop":
        budget = 1.0
    span = _region(options.pop("span"), options.pop("image_token_id"))
    return compile_decoder(model, ids, budget=budget, keep=keep, layer=layer, span=span, padding=padding,
                           extra_inputs=extra, options=_parse_options(options.pop("method_options")), **options)


def _changed_reduction_options(reduction: dict) -> list[str]:
    """The reduction options given on the command line (not at their defaults), as their flags."""
    flags = {"method_options": "--option"}
    return [flags.get(key, "--" + key.replace("_", "-")) for key, value in reduction.items()
            if value != REDUCTION_DEFAULTS[key]]


def _describe(report: dict) -> str:
    return (f"prefill FLOPs ratio {report['flops_ratio']:.3f}, layer {report['layer']}, span kept "
            f"{report['span_tokens_kept']}/{report['span_tokens_removable']}, tokens per layer "
            f"{report['tokens_per_layer']}")


def _load_tokenizer(folder: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(folder, **extra)
    except (OSError, ValueError) as error:
        raise TokenCompileError(f"cannot load a tokenizer from {folder}: {str(error).splitlines()[0]}",
                                "give a Hugging Face model folder (and --gguf-file for a GGUF one)") from None


def _model_and_prompts(model_dir, gguf_file, tokenizer_dir, prompts, prompt_ids, images, chat):
    """The model of MODEL_DIR, its tokenizer, and the prompts as (ids, attention mask or None, extra
    inputs or None): text prompts (several: padded on the left), or a vision-language model's prompts with their
    images (of different lengths: padded on the left)."""
    model, tokenizer, processor = load_decoder_model(model_dir, gguf_file, tokenizer_dir, bool(images))
    if images:
        if not prompts:
            raise TokenCompileError("--image goes with --prompt text", "give --prompt with each --image")
        ids, mask, extra = _image_prompts(processor, prompts, images, chat, model=model)
        return model, tokenizer, ids, mask, extra
    if len(prompts) > 1:
        ids, mask = _padded_prompts(tokenizer, prompts, model_dir, chat=chat)
    else:
        ids, mask = _prompt(tokenizer, prompts[0] if prompts else None, prompt_ids, model_dir, chat), None
    return model, tokenizer, ids, mask, None


def generate_command(command_class, debug_option):
    from .onnx_export import MANIFEST

    @click.command("generate", cls=command_class)
    @click.argument("model_dir")
    @click.option("--prompt", "prompts", multiple=True, help="Prompt text (needs a tokenizer in MODEL_DIR, or "
                  "--tokenizer); repeat it for a batch, padded on the left.")
    @click.option("--prompt-ids", help="Prompt as comma-separated token ids (instead of --prompt).")
    @click.option("--tokenizer", "tokenizer_dir", help="Tokenizer folder (for an exported decoder folder; an "
                  "exported VLM: the model folder with its processor, and its weights when the export takes "
                  "inputs_embeds).")
    @click.option("--image", "images", multiple=True, help="The image of a --prompt (a vision-language model: one per "
                  "prompt; its placeholders go first unless the prompt holds them).")
    @_compile_options
    @click.option("--max-new-tokens", type=int, default=32, show_default=True)
    @click.option("--chat", is_flag=True, help="Each --prompt as the user turn of the tokenizer's chat template "
                  "(instruct models).")
    @click.option("--sample", is_flag=True, help="Sample the tokens (default: greedy).")
    @click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature.")
    @click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the K most likely (0: all).")
    @click.option("--top-p", type=float, default=1.0, show_default=True,
                  help="Sample from the most likely tokens holding probability P (1: all).")
    @click.option("--seed", type=int, help="Seed of the sampling (default: a fresh one, printed).")
    @click.option("--report", "report_path", help="Write the report (JSON).")
    @debug_option
    def generate(model_dir, prompts, prompt_ids, tokenizer_dir, images, gguf_file, max_new_tokens, chat, sample,
                 temperature, top_k, top_p, seed, report_path, debug, **reduction):
        """Generation (greedy, or --sample) with the prompt reduced in prefill; prints the continuation
        (one line per prompt) and tokens per layer.

        MODEL_DIR is a Hugging Face causal LM or vision-language model folder, or a folder written by
        `export-decoder` (then the reduction was chosen at export and prefill and decode run in ONNX
        Runtime). Several --prompt options make one batch, padded on the left (an exported folder: export
        it with --padding). A vision-language model (its processor saved with it)
        takes one --image per --prompt."""
        import os
        import random

        import torch

        from . import generate as greedy
        from .generate import token_chooser
        from .prefill import eos_token_id

        if bool(prompts) == (prompt_ids is not None):
            raise TokenCompileError("give exactly one of --prompt and --prompt-ids")
        if max_new_tokens < 1:
            raise TokenCompileError(f"--max-new-tokens {max_new_tokens} is below 1", "give --max-new-tokens >= 1")
        if not sample and seed is not None:
            raise TokenCompileError("--seed seeds sampling; greedy decoding has nothing to seed", "add --sample")
        sampling = dict(do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p)
        try:
            token_chooser(**sampling)
        except TokenCompileError as error:  # the API's message, in the CLI's words
            names = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                     " and generator": "", "do_sample=True": "--sample"}
            raise TokenCompileError(*[_replace_all(part, names) for part in (error.problem, error.fix)]) from None
        if sample:
            seed = random.randrange(2**31) if seed is None else seed
            sampling["generator"] = torch.Generator().manual_seed(seed)
        if report_path:  # checked before the model loads (see tokencompile.outputs)
            from ..outputs import check_output

            report_path = check_output(report_path, "--report", (".json",), [model_dir])
        if os.path.isfile(os.path.join(model_dir, MANIFEST)):
            from .onnx_export import OnnxRunner

            given = _changed_reduction_options(reduction)
            if given:
                raise TokenCompileError(f"{model_dir} is an exported decoder: its reduction was chosen at export, "
                                        f"{', '.join(given)} cannot change it", "drop them, or export again")
            source = OnnxRunner(model_dir)
            extra = None
            if {PIXELS, EMBEDS} & set(source.extra_inputs) or images:
                if not {PIXELS, EMBEDS} & set(source.extra_inputs):
                    raise TokenCompileError(f"{model_dir} was exported from a text model", "drop --image")
                if not images or not tokenizer_dir or not prompts:
                    raise TokenCompileError(f"{model_dir} is an exported vision-language model",
                                            "give --prompt, --image and --tokenizer MODEL_DIR (the model folder "
                                            "with its processor)")
                processor = _load_processor(tokenizer_dir)
                # merged embeddings: the model's own vision code runs (in torch) before the exported graphs
                vision = load_decoder_model(tokenizer_dir, None, None, True)[0] if EMBEDS in source.extra_inputs \
                    else None
                ids, mask, extra = _image_prompts(processor, prompts, images, chat,
                                                  source.prompt_tokens if source.masked else None, vision,
                                                  merged=vision is not None)
                if mask is not None and not source.masked:
                    raise TokenCompileError(f"{model_dir} was exported for single prompts of {source.prompt_tokens} "
                                            "tokens", "export it with --padding to give prompts of other lengths")
                tokenizer = processor.tokenizer
            else:
                tokenizer = _load_tokenizer(tokenizer_dir, gguf_file) if tokenizer_dir else None
                if source.masked and prompts:  # a padded export takes any prompt up to its length
                    ids, mask = _padded_prompts(tokenizer, prompts, model_dir, source.prompt_tokens, chat)
                elif len(prompts) > 1:
                    raise TokenCompileError(f"{model_dir} was exported for single prompts of "
                                            f"{source.prompt_tokens} tokens", "export it with --padding to give "
                                            "several prompts")
                else:
                    ids = _prompt(tokenizer, prompts[0] if prompts else None, prompt_ids, model_dir, chat)
                    mask = None
            report, eos = source.manifest["report"], source.manifest.get("eos_token_id")
        else:
            model, tokenizer, ids, mask, extra = _model_and_prompts(model_dir, gguf_file, tokenizer_dir, prompts,
                                                                    prompt_ids, images, chat)
            source = _compile(model, ids, reduction, padding=mask is not None, extra=extra)
            report, eos = source.report, eos_token_id(model)
        out = greedy(source, ids, max_new_tokens, eos_token_id=eos, attention_mask=mask, extra=extra, **sampling)
        generated = [_until_eos(row[ids.shape[1]:].tolist(), eos) for row in out]
        for new in generated:
            text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
            click.echo(",".join(map(str, new)) if text is None else text)
        report = {**report, "generated_ids": generated[0] if len(generated) == 1 else generated}
        if sample:
            report["sampling"] = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        click.echo(_describe(report), err=True)
        if sample:
            click.echo(f"sampled with --seed {seed}", err=True)
        if report_path:
            from ..outputs import write_json

            write_json(report_path, report)

    return generate


def export_decoder_command(command_class, debug_option):
    @click.command("export-decoder", cls=command_class)
    @click.argument("model_dir")
    @click.option("-o", "--output", "folder", required=True, help="Folder for prefill.onnx, decode.onnx and "
                  "decoder.json.")
    @click.option("--prompt", help="Example prompt text: fixes the prompt length (and image-token positions).")
    @click.option("--image", help="Example image of the prompt (a vision-language model).")
    @click.option("--chat", is_flag=True, help="The example --prompt as the user turn of the chat template.")
    @click.option("--prompt-ids", help="Example prompt as comma-separated token ids.")
    @click.option("--prompt-tokens", type=int, help="Prompt length, for a span given by --span (random example ids).")
    @_compile_options
    @click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (TensorRT 10 reads 9..20).")
    @click.option("--verify", is_flag=True, help="Compare ONNX Runtime with torch: prefill, and 8 greedy tokens.")
    @click.option("--check", "check_target", type=click.Choice(["trt"]), help="Report ops TensorRT cannot build, "
                  "in both graphs.")
    @click.option("--force", is_flag=True, help="Replace the files of an earlier export in the folder.")
    @click.option("--padding", is_flag=True, help="Graphs for batches of shorter prompts padded on the left: an "
                  "attention_mask input and per-layer key masks.")
    @click.option("--external-data", is_flag=True, help="Each graph's weights in NAME.onnx.data beside it "
                  "(automatic past 2 GB, the limit of one ONNX file).")
    @debug_option
    def export_decoder(model_dir, folder, prompt, image, chat, prompt_ids, prompt_tokens, gguf_file, opset, verify,
                       check_target, force, padding, external_data, debug, **reduction):
        """Compile the prompt reduction of a causal LM or a vision-language model (--image) and write prefill and
        decode as two ONNX graphs."""
        import os
        import sys

        import torch

        from .onnx_export import (
            DECODE,
            MANIFEST,
            PREFILL,
            OnnxRunner,
            export_decoder_onnx,
        )

        if sum(x is not None for x in (prompt, prompt_ids, prompt_tokens)) != 1:
            raise TokenCompileError("give exactly one of --prompt, --prompt-ids and --prompt-tokens")
        if prompt_tokens is not None and prompt_tokens < 2:
            raise TokenCompileError(f"--prompt-tokens {prompt_tokens} is below 2", "give --prompt-tokens 2 or more")
        if not 9 <= opset <= 20:
            raise TokenCompileError(f"--opset {opset} is out of range", "give an opset from 9 to 20")
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise TokenCompileError(f"-o {folder} is a file", "give a folder")
        existing = [name for name in (PREFILL, DECODE, MANIFEST, f"{PREFILL}.data", f"{DECODE}.data")
                    if os.path.exists(os.path.join(folder, name))]
        if existing and not force:
            raise TokenCompileError(f"{folder} already holds {', '.join(existing)}", "add --force to replace them")
        if os.path.abspath(folder) == os.path.abspath(model_dir):
            raise TokenCompileError("-o is the model folder: its files would be mixed with the export",
                                    "choose another folder")
        extra = None
        if prompt_tokens is None:
            model, _, ids, _, extra = _model_and_prompts(model_dir, gguf_file, None, (prompt,) if prompt else (),
                                                         prompt_ids, (image,) if image else (), chat)
        else:
            if image is not None:
                raise TokenCompileError("--image goes with an example --prompt", "give --prompt instead of "
                                        "--prompt-tokens")
            from .prefill import text_config

            model, _, _ = load_decoder_model(model_dir, gguf_file, None, False)
            vocab = text_config(model).vocab_size
            ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
        program = _compile(model, ids, reduction, padding=padding, extra=extra)
        click.echo(_describe(program.report))
        info = export_decoder_onnx(program, folder, opset=opset, external_data=external_data or None)
        click.echo(f"wrote {info.prefill} and {info.decode} ({info.layers} layers, opset {opset}, checker passed, "
                   f"{info.seconds:.0f} s)")
        failed = False
        if verify:
            from . import generate as greedy
            from . import prefill

            runner = OnnxRunner(folder)
            second, mask = ids.flip(1), None
            if extra is not None:  # the second image mirrored (language-model inputs: in the order of its ids)
                extra = {name: torch.cat([t, t.flip(TOKEN_AXIS.get(name, -1))]) for name, t in extra.items()}
            if padding:  # the second prompt a quarter shorter, padded on the left
                second, mask, columns = _left_padded(second, ids.shape[1] // 4, program.report.get("span_token_id"))
                for name, axis in TOKEN_AXIS.items():
                    if name in (extra or {}):
                        moved = extra[name][1].index_select(axis, columns.clamp(min=0))
                        extra[name][1] = moved * (columns >= 0).view(-1, *[1] * (-axis - 1))
                extra = {**(extra or {}), "attention_mask": mask}
            batch = torch.cat([ids, second])
            expected_logits, expected_caches = prefill(program, batch, extra)
            logits, caches = runner.prefill(batch, extra)
            # relative to each tensor's largest value: logits of real LMs reach tens, float noise grows with them;
            # cache slots of padding are never read (their values differ between runtimes)
            error = max(float((a - b).abs().max() / b.abs().max().clamp(min=1)) for a, b in
                        zip([logits, *_read_slots(caches)], [expected_logits, *_read_slots(expected_caches)]))
            same = torch.equal(greedy(program, batch, 8, extra=extra, attention_mask=mask),
                               greedy(runner, batch, 8, extra=extra, attention_mask=mask))
            click.echo(f"verify batch 2: prefill max error {error:.2e} of the largest value (limit 1e-4), 8 greedy "
                       f"tokens {'identical' if same else 'DIFFERENT'}")
            failed |= error > 1e-4 or not same
        if check_target == "trt":
            import onnx

            from ..lowering.tensorrt_check import check_tensorrt

            for path in (info.prefill, info.decode):
                findings = check_tensorrt(onnx.load(path, load_external_data=False))
                blocking = [f for f in findings if f.blocking]
                for finding in findings:
                    click.echo(f"{os.path.basename(path)}: {finding}")
                click.echo(f"TensorRT check of {os.path.basename(path)}: {len(blocking)} blocking, "
                           f"{len(findings) - len(blocking)} notes")
                failed |= bool(blocking)
        if failed:
            sys.exit(1)

    return export_decoder


def _lm_data(model_dir: str, tokenizer_dir: str | None, gguf_file: str | None, data_path: str, prompt_tokens: int,
             continuation: int, limit: int | None):
    from ..evaluation.lm import lm_windows

    model, tokenizer = load_causal_lm(model_dir, gguf_file)
    if tokenizer_dir:
        tokenizer = _load_tokenizer(tokenizer_dir, gguf_file)
    if tokenizer is None:
        raise TokenCompileError(f"{model_dir} has no tokenizer", "give --tokenizer DIR")
    return model, lm_windows(tokenizer, data_path, prompt_tokens, continuation, limit)


def eval_lm(model_dir: str, exported: str, data_path: str, tokenizer_dir: str | None, gguf_file: str | None,
            continuation: int, batch: int, limit: int | None, progress=None) -> dict:
    """`eval --task lm`: an exported decoder (ONNX Runtime) against the full causal LM (torch)."""
    from ..evaluation.lm import evaluate_lm
    from .onnx_export import OnnxRunner

    runner = OnnxRunner(exported)
    model, windows = _lm_data(model_dir, tokenizer_dir, gguf_file, data_path, runner.prompt_tokens, continuation,
                              limit)
    result = evaluate_lm(model, runner, windows, runner.prompt_tokens, batch, progress)
    report = runner.manifest["report"]
    return {**result, "flops_ratio": report["flops_ratio"], "layer": report["layer"]}


# set on calibration texts (benchmarks/decoder_fidelity.py): the attention scores pooled, with the
# prompt-lookup prior; every method keeps the first 4 tokens (attention sinks)
TEXT_SETTINGS = {"fastv": {"sinks": 4, "pool": 15, "lookup": 16}, "pyramiddrop": {"sinks": 4, "pool": 15, "lookup": 16},
                 "other": {"sinks": 4}}


def sweep_lm(model_dir: str, data_path: str, tokenizer_dir: str | None, gguf_file: str | None, method_list: str,
             budgets: list[float], prompt_tokens: int, protected: int, continuation: int, batch: int,
             limit: int | None, progress=None) -> dict:
    """`sweep --task lm`: every decoder method at every prefill budget, in torch, on windows of a text file,
    each with the settings recommended for text (``TEXT_SETTINGS``)."""
    from ..evaluation.lm import evaluate_lm
    from ..evaluation.sweep import parse_list
    from . import Span, compile_decoder, reuse_traces

    names = list(CLI_METHODS) if method_list == "all" else parse_list(method_list, str, "methods")
    unknown = [name for name in names if name not in CLI_METHODS]
    if unknown:
        raise TokenCompileError(f"{', '.join(unknown)}: not a decoder method", f"give one of: "
                                f"{', '.join(CLI_METHODS)}")
    if protected >= prompt_tokens:
        raise TokenCompileError(f"--protected {protected} leaves no span in a {prompt_tokens}-token prompt",
                                "give --protected below --prompt-tokens")
    model, windows = _lm_data(model_dir, tokenizer_dir, gguf_file, data_path, prompt_tokens, continuation, limit)
    original = {"flops_ratio": 1.0, "next_token_agreement": 1.0, "perplexity_change": 0.0}
    runs = []
    with reuse_traces():  # every run compiles the same model on the same prompt: one export
        for name in names:
            for budget in budgets:
                try:
                    settings = TEXT_SETTINGS.get(name, TEXT_SETTINGS["other"])
                    program = compile_decoder(model, windows[:1, :prompt_tokens], budget=budget, method=name,
                                              span=Span(0, prompt_tokens - protected), **settings)
                    result = evaluate_lm(model, program, windows, prompt_tokens, batch)
                    original["perplexity"] = result["perplexity_original"]
                    runs.append({"method": name, "budget": budget, "settings": settings,
                                 "flops_ratio": program.report["flops_ratio"], "layer": program.report["layer"],
                                 "tokens_per_layer": program.report["tokens_per_layer"],
                                 **{k: result[k] for k in ("next_token_agreement", "perplexity", "perplexity_change")}})
                except TokenCompileError as error:
                    runs.append({"method": name, "budget": budget, "error": str(error)})
                if progress:
                    progress(f"sweep: {name} at {budget:g} done")
    return {"task": "lm", "samples": len(windows), "primary": "next_token_agreement", "original": original,
            "runs": runs, "prompt_tokens": prompt_tokens, "protected": protected, "continuation": continuation}


__all__ = ["eval_lm", "export_decoder_command", "generate_command", "load_causal_lm", "sweep_lm"]
