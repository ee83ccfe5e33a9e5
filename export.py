"""Export a trained model to share it: the weights in safetensors, the model's shape, its tokenizer and a
model card; with --hf, also a Hugging Face Transformers folder.

    python export.py --checkpoint X --out DIR [--hf] [--4bit] [--replace]

DIR holds model.safetensors (the weights only, under their checkpoint names and shapes), config.json,
tokenizer.json (and tokenizer_config.json) and README.md. --hf adds generation_config.json, the
configuration and modeling files, and model.py, that AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True) loads.
--4bit stores encoder, encoder_v and decoder as the 4-bit weights a use_4bit run trained for (the
model sample.py --4bit serves): per weight W, W_4bit (uint8, two codes per byte, high nibble first),
W_absmax (float32, one scale per block of 64 values) and one quant_map (the 16 levels); a value is
quant_map[code] x its block's scale (model.unpack_4bit).
"""
import argparse
import json
import math
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from arguments import parse_arguments
from checkpoint import EXPORT_VERSION, CheckpointError, saved_step
from config_file import config_value
from files import REPO, read_records, resumed_configs, write_folder
from lowbit import BLOCKSIZE, LowBitError, export_4bit, full_precision_note, post_training_note
from model import LAYER_WEIGHTS, SAMPLE_TEMPERATURE, BDHConfig
from locate import add_checkpoint_arguments, is_run_directory, open_checkpoint
from tokenizer import SEPARATOR_TOKEN, TokenizerError, tokenizer_from_string

HF_FILES = {REPO / "hf" / "configuration_bdh.py": "configuration_bdh.py",
            REPO / "hf" / "modeling_bdh.py": "modeling_bdh.py", REPO / "model.py": "model.py"}
EXPORT_FILES = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                "generation_config.json", *HF_FILES.values()}  # what write_export writes: all that --replace may delete


def weights(ckpt, four_bit: bool) -> dict:
    if not four_bit:
        return {name: tensor.contiguous() for name, tensor in ckpt.model.items()}
    low_precision = ckpt.low_precision()
    tensors = {name: ckpt.model[name].contiguous() for name in ckpt.model if name not in LAYER_WEIGHTS}
    for name in LAYER_WEIGHTS:
        packed = export_4bit(ckpt.model[name], low_precision["quantization_type"], low_precision["use_double_quant"])
        tensors[f"{name}_4bit"], tensors[f"{name}_absmax"], tensors["quant_map"] = (
            packed["codes"], packed["absmax"], packed["quant_map"])
    return tensors


def config_json(ckpt, tokenizer, source: Path, hf: bool, four_bit: bool) -> dict:
    low_precision = ckpt.low_precision()
    quant_type = low_precision["quantization_type"]
    config = {**ckpt.model_config, "tokenizer_vocab_size": tokenizer.vocab_size,
              "separator_token_id": tokenizer.separator,
              "trained_block_size": config_value(ckpt.config, "training.block_size"),
              "low_precision": {"use_4bit": low_precision["use_4bit"], "quantization_type": quant_type,
                                "use_double_quant": low_precision["use_double_quant"]},
              "weights_4bit": {"quant_type": quant_type, "blocksize": BLOCKSIZE} if four_bit else None,
              "bdh_export": {"version": EXPORT_VERSION, "tokenizer": "bytes" if tokenizer.to_str() == "bytes"
                             else "tokenizer.json", "step": ckpt.step, "checkpoint": str(source),
                             # how its run held out validation documents: a fine-tune on the same data keeps them out
                             "split_by": config_value(ckpt.config, "dataset.split_by")}}
    if hf:
        config.update(model_type="bdh", architectures=["BDHForCausalLM"], torch_dtype="float32",
                      auto_map={"AutoConfig": "configuration_bdh.BDHConfig",
                                "AutoModelForCausalLM": "modeling_bdh.BDHForCausalLM"})
    return config


def last_evaluation(source: Path, step: int) -> dict:
    """The last evaluation at or before `step` in the run's metrics.jsonl (empty if none)."""
    path = source.parent / "metrics.jsonl"
    records = read_records(path)[0] if path.exists() else []
    return ([r for r in records if "val_loss" in r and r["step"] <= step] or [{}])[-1]


def model_card(ckpt, tokenizer, source: Path, out: str, hf: bool, four_bit: bool) -> str:
    config, shape = ckpt.config, ckpt.model_config
    training = config.get("training", {})
    folder = Path(out).name  # as whoever downloads it has it, not where it was written
    model_shape = BDHConfig(**shape)
    n_latent, n_params = model_shape.n_latent, model_shape.n_params
    evaluated = last_evaluation(source, ckpt.step)
    if "val_bits_per_byte" in evaluated or math.isfinite(ckpt.best_val_loss):
        result = (f"validation loss {evaluated['val_loss']:.4f} nats per token, {evaluated['val_bits_per_byte']:.4f} "
                  f"bits per byte, at step {evaluated['step']}" if "val_bits_per_byte" in evaluated
                  else f"best validation loss {ckpt.best_val_loss:.4f} nats per token")
        if evaluated.get("weights_4bit", ckpt.low_precision().get("use_4bit")):  # (older records: the run's setting)
            result += " (of the model with encoder, encoder_v, decoder in 4 bits: low_precision.use_4bit)"
        elif four_bit:
            result += (" (of the weights as trained; their 4-bit version here, quantized after training, was not "
                       "measured)")
        if evaluated.get("step", ckpt.step) < ckpt.step:  # a stop between evaluations, checkpoint_freq off test_freq
            result += (f"; the run's last evaluation: step {ckpt.step}'s weights, exported here, were not measured "
                       f"(best.pt holds the best measured ones)")
    else:
        result = "not evaluated yet (stopped before its first evaluation)"
    tokens = "UTF-8 bytes" if tokenizer.to_str() == "bytes" else f"a {tokenizer.vocab_size:,}-token tokenizer.json"
    weights_note = "float32"
    if four_bit:
        weights_note = (f"encoder, encoder_v, decoder in 4 bits ({ckpt.low_precision()['quantization_type']}, "
                        f"blocks of {BLOCKSIZE}), the rest float32")
    dataset = config.get("dataset", {})
    front_matter = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- bdh", "---",
                    ""] if hf else []  # (the Hub reads these)
    lines = [*front_matter, f"# BDH ({source.parent.name}, step {ckpt.step})", "",
             "A BDH language model (\"Baby Dragon Hatchling\", arXiv 2509.26507) trained with the BDH training "
             "script; MODEL.md of that repository states its exact function.", "",
             f"- model: {shape['n_layer']} layers, n_embd {shape['n_embd']}, {shape['n_head']} heads, "
             f"{n_latent:,} latent neurons per head, vocabulary {shape['vocab_size']:,}; {n_params / 1e6:.2f}M parameters",
             f"- weights: {weights_note}",
             f"- tokens: {tokens}",
             f"- data: {dataset.get('parquet_dir')} (column {dataset.get('text_column')!r}), validation "
             + (f"{dataset['val_parquet_dir']}" if dataset.get("val_parquet_dir")
                else f"fraction {dataset.get('val_fraction')} (split_seed {dataset.get('split_seed')}, held out by "
                     f"{dataset.get('split_by')})")
             + (f", measured on up to {training['eval_iters']} batches (training.eval_iters)"  # (2 say less than 200)
                if "eval_iters" in training else ""),
             f"- training: step {ckpt.step} of {training.get('max_iters')}, batch {training.get('batch_size')} x "
             f"block {training.get('block_size')} x accumulation {training.get('gradient_accumulation_steps')}"
             + (f" x {len(ckpt.rng)} processes" if len(ckpt.rng) > 1 else "")
             + (f"; {ckpt.tokens:,} tokens trained on" if ckpt.tokens is not None else ""),
             *([f"- context: trained on windows of {training['block_size']} tokens; generation runs longer, but past "
                f"that length it reads positions it never trained at, and its loss grows"] * ("block_size" in training)),
             *started_from(source.parent),
             *settings_changed(source.parent, ckpt.step),
             f"- result: {result}", "",
             "## Use", "", "With the training repository:", "",
             f"    python sample.py --checkpoint {shlex.quote(folder)} --prompt \"...\"", ""]
    if hf:
        lines += ["With Hugging Face Transformers:", "",
                  "    from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"    model = AutoModelForCausalLM.from_pretrained({json.dumps(folder)}, trust_remote_code=True)",
                  f"    tokenizer = AutoTokenizer.from_pretrained({json.dumps(folder)}, trust_remote_code=True)",
                  "    ids = model.generate(**tokenizer(\"...\", return_tensors=\"pt\"), max_new_tokens=100)",
                  "    print(tokenizer.decode(ids[0]))", ""]
    lines += ["## The run's configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def started_from(run: Path) -> list[str]:
    """A line for the model card of a run that started from another model (a fine-tune of an export, a
    checkpoint outside a run): its first settings' resume_from_checkpoint."""
    if not is_run_directory(run):  # (a loose checkpoint beside some config file)
        return []
    try:
        first = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        start = first["training"]["resume_from_checkpoint"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []
    if not start or start in ("latest", "auto"):  # (a run continued in a new folder: another run's checkpoint)
        return []
    try:
        exported = json.loads((Path(start) / "config.json").read_text())["bdh_export"]
        origin = f" (exported at step {exported['step']} of {exported['checkpoint']})"
    except (OSError, ValueError, KeyError, TypeError):
        origin = ""
    return [f"- started from: {start}{origin}; trained further on the data above"]


def settings_changed(run: Path, step: int) -> list[str]:
    """A line for the model card if resumes before `step` changed the run's settings (rundir's
    config_resume_<step>.yaml): the card's settings are the last ones."""
    steps = [at for at, _ in resumed_configs(run) if at < step]
    if not steps:
        return []
    return [f"- settings: resumed with other settings after step{'s' * (len(steps) > 1)} "
            f"{', '.join(map(str, steps))}; those given here are the ones from step {steps[-1] + 1} on"]


def write_export(folder: Path, ckpt, source: Path, out: str, hf: bool, four_bit: bool):
    from safetensors.torch import save
    tokenizer = tokenizer_from_string(ckpt.tokenizer)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(save(weights(ckpt, four_bit), metadata={"format": "pt"}))
    config = config_json(ckpt, tokenizer, source, hf, four_bit)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "tokenizer.json").write_text(tokenizer.to_hf_json())
    # split_special_tokens: a literal <|endoftext|> in a text is text, as in training and sample.py
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                        "split_special_tokens": True}
    if tokenizer.to_str() != "bytes":  # its separator is a special token; the byte 0x00 is an ordinary one
        tokenizer_config.update(bos_token=SEPARATOR_TOKEN, eos_token=SEPARATOR_TOKEN)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(ckpt, tokenizer, source, out, hf, four_bit))
    if hf:
        for source_file, name in HF_FILES.items():
            shutil.copyfile(source_file, folder / name)
        # generate() reads these from here, not from config.json: stop at the separator, start there without a prompt;
        # sample as sample.py does (its temperature, no top-k): greedy decoding repeats itself on a small model
        generation = {"bos_token_id": tokenizer.separator, "eos_token_id": tokenizer.separator,
                      "pad_token_id": tokenizer.separator, "do_sample": True, "top_k": 0,
                      "temperature": SAMPLE_TEMPERATURE}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_checkpoint_arguments(parser, exports=False)
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--hf", action="store_true", help="also a Hugging Face Transformers folder (trust_remote_code)")
    parser.add_argument("--4bit", dest="four_bit", action="store_true",
                        help="encoder, encoder_v, decoder as 4-bit weights (for models trained with use_4bit)")
    parser.add_argument("--replace", action="store_true", help="replace an --out folder that holds files")
    args = parse_arguments(parser, argv)
    if not args.out.strip():
        parser.error("--out is empty: give the folder to write, e.g. --out my-bdh")
    try:
        source, ckpt = open_checkpoint(args.checkpoint, args.checkpoint_dir, setting="--checkpoint")
        best = source.with_name("best.pt")
        if not Path(args.checkpoint).is_file() and source != best and best.is_file() and saved_step(best) < ckpt.step:
            print(f"note: {source} is the run's newest checkpoint; its best validation loss "
                  f"({ckpt.best_val_loss:.4f}) is best.pt's, of step {saved_step(best)}: --checkpoint {best} exports "
                  f"that", file=sys.stderr)
        if args.four_bit and not ckpt.low_precision()["use_4bit"]:
            print(post_training_note(source), file=sys.stderr)
        elif not args.four_bit and ckpt.low_precision()["use_4bit"]:
            print(full_precision_note(source, "--4bit"), file=sys.stderr)
        write_folder(args.out, lambda folder: write_export(folder, ckpt, source, args.out, args.hf, args.four_bit),
                     replace=args.replace, written_here=lambda path: path.is_file() and path.name in EXPORT_FILES)
    except (CheckpointError, TokenizerError, LowBitError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: --out {args.out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 1
    print(f"exported step {ckpt.step} of {source} to {args.out}" + (" (a Hugging Face folder too)" if args.hf else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
