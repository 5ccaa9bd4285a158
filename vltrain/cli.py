"""The vltrain command line: train, eval, data (synth, digits, photos, import, dedup), tokenizer (train).

`vltrain train` runs on every rank under torchrun, srun or a plain `python`; clusterctl instead
submits `vltrain.loop.TrainJob`, the same loop. A `UserError` becomes one line `error: ...` on stderr
and exit code 2 (`--debug` shows the traceback). torch, deepspeed and webdataset are imported inside
the commands that need them, so `--help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from vltrain.common.cligroup import ErrorGroup
from vltrain.config import parse_overrides
from vltrain.rundir import JobEnv, RunDir

app = typer.Typer(
    cls=ErrorGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="vltrain: vision-language pre-training on DeepSpeed ZeRO (CPU or CUDA).",
)
data_app = typer.Typer(
    no_args_is_help=True,
    help="Image-text shards: synthetic data, the bundled real digits and photos, imports, deduplication.",
)
tok_app = typer.Typer(no_args_is_help=True, help="SentencePiece tokenizer.")
app.add_typer(data_app, name="data")
app.add_typer(tok_app, name="tokenizer")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    ErrorGroup.debug = debug


@app.command()
def train(
    config: Path = typer.Option(None, "--config", "-c", help="Train config TOML (default: built-in defaults)."),
    run_dir: Path = typer.Option(
        ...,
        "--run-dir",
        envvar=JobEnv.RUN_DIR,
        show_envvar=True,
        help="Run directory: metrics, events, checkpoints, eval.json.",
    ),
    set_: list[str] = typer.Option([], "--set", help="Config override key=value, repeatable (e.g. optim.lr=3e-4)."),
    stop_after: int = typer.Option(
        None, "--stop-after", min=1, help="End this attempt after N steps, with a checkpoint."
    ),
    local_rank: int = typer.Option(
        None, "--local_rank", "--local-rank", hidden=True, help="Set by the deepspeed launcher; ignored."
    ),
) -> None:
    """Train (or resume from the newest complete checkpoint in --run-dir)."""
    from vltrain.config import load_train_config

    cfg = load_train_config(config, parse_overrides(set_))
    from vltrain.loop import train as run

    run(cfg, run_dir, stop_after=stop_after)


@app.command("eval")
def eval_(
    run_dir: Path = typer.Option(..., "--run-dir", help="Run directory with a complete checkpoint."),
    classes: Path = typer.Option(
        None, "--classes", help="classes.json for zero-shot (default: beside the held-out shards)."
    ),
) -> None:
    """Recall@1/5/10 (image->text, text->image), CIDEr-D and zero-shot top-1/5 (held-out shards with
    classes) on the held-out shards; writes eval.json."""
    from vltrain.evaluate import evaluate_run
    from vltrain.zero_shot import zero_shot_line

    r = evaluate_run(run_dir, classes)
    typer.echo(f"step {r['step']} ({r['checkpoint']}), {r['n']} held-out pairs, chance R@1 {r['chance_r1']:.4f}")
    for way in ("i2t", "t2i"):
        typer.echo(f"  {way}  " + "  ".join(f"{k} {v:.3f}" for k, v in r[way].items()))
    typer.echo(f"  CIDEr-D {r['cider']:.3f} on {r['caption_samples']} generated captions")
    if "zero_shot" in r:
        typer.echo(f"  {zero_shot_line(r['zero_shot'])} on {r['zero_shot']['n']} labelled images")
    typer.echo(f"wrote {RunDir(run_dir).eval}")


@app.command("export")
def export_(
    run_dir: Path = typer.Argument(..., help="Run directory with a complete checkpoint."),
    out: Path = typer.Option(
        None, "--out", help="Output .safetensors (default: RUN_DIR/export_stepN[_PART].safetensors)."
    ),
    part: str = typer.Option("", "--part", help="One model part (vision, text, embed, decoder, ...; default: all)."),
    step: int = typer.Option(None, "--step", help="The checkpoint at this step (default: the newest)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16."),
) -> None:
    """Model weights of a checkpoint as safetensors (loadable by [init_from] and other tools)."""
    from vltrain.export import export

    r = export(run_dir, out, part, step, dtype)
    typer.echo(f"wrote {r['out']}: {r['tensors']} tensors, {r['params']:,} parameters ({r['dtype']}, step {r['step']})")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Output directory (new or empty)."),
    n: int = typer.Option(..., "--n", help="Training samples."),
    shards: int = typer.Option(..., "--shards", help="Training shards."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed writes byte-identical shards."),
    holdout: int = typer.Option(500, "--holdout", help="Held-out samples written to OUT/eval (0 = none)."),
    image_size: int = typer.Option(64, "--image-size", help="Image side in pixels."),
) -> None:
    """Procedural scenes of coloured shapes with captions that describe them (img2dataset layout)."""
    from vltrain.data.synth import write_synthetic_shards

    s = write_synthetic_shards(out, n=n, shards=shards, seed=seed, image_size=image_size, holdout=holdout)
    typer.echo(
        f"wrote {s['samples']} samples in {len(s['shards'])} shards to {s['out']}"
        + (f", {s['eval_samples']} held out in {s['eval_out']}" if s["eval_samples"] else "")
    )


@data_app.command("digits")
def data_digits(
    out: Path = typer.Option(..., "--out", help="Output directory (new or empty)."),
    holdout: int = typer.Option(300, "--holdout", help="Held-out digits written to OUT/eval (class-stratified)."),
    image_size: Optional[int] = typer.Option(
        None, "--image-size", help="Image side in pixels (default: the digits recipe's)."
    ),
    seed: int = typer.Option(0, "--seed", help="Split and caption seed: the same seed writes byte-identical shards."),
) -> None:
    """scikit-learn's 1,797 real handwritten digits as shards, classes.json and a train config (OUT/train.toml)."""
    from vltrain.data.digits import write_digits

    s = write_digits(out, holdout=holdout, image_size=image_size, seed=seed)
    typer.echo(
        f"wrote {s['samples']} digits in {len(s['shards'])} shards to {s['out']}, {s['eval_samples']} held out "
        f"in {s['eval_out']} ({s['image_size']} px, {s['classes']} classes)"
    )
    typer.echo(f"train: vltrain train --config {s['config']} --run-dir RUN")


@data_app.command("photos")
def data_photos(
    out: Path = typer.Option(..., "--out", help="Output directory (new or empty)."),
    image_size: int = typer.Option(32, "--image-size", help="Crop side in pixels."),
    crops: int = typer.Option(32, "--crops", help="Random training crops per photo."),
    seed: int = typer.Option(0, "--seed", help="Crop and caption seed: the same seed writes byte-identical shards."),
) -> None:
    """scikit-image's photos with hand-written captions: random training crops, a held-out centre crop each."""
    from vltrain.data.photos import write_photos

    s = write_photos(out, image_size=image_size, crops=crops, seed=seed)
    typer.echo(
        f"wrote {s['samples']} crops of {len(s['photos'])} photos to {s['out']}, {s['eval_samples']} held out "
        f"in {s['eval_out']} ({s['image_size']} px)" + (f"; skipped {', '.join(s['skipped'])}" if s["skipped"] else "")
    )
    typer.echo(f"train: vltrain train --config {s['config']} --run-dir RUN")


@data_app.command("dedup")
def data_dedup(
    in_: Path = typer.Option(..., "--in", help="Input shards (directory, brace pattern or tar)."),
    out: Path = typer.Option(..., "--out", help="Output directory (new or empty)."),
    json_: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Copy shards without exact-duplicate images (SHA-256 of the image bytes; first occurrence kept)."""
    from vltrain.data.dedup import dedup_shards

    s = dedup_shards(in_, out)
    if json_:
        typer.echo(json.dumps(s, indent=2, default=str))
    else:
        typer.echo(f"kept {s['kept']} of {s['samples']} samples; removed {s['removed']} exact duplicates -> {out}")


@data_app.command("import")
def data_import(
    out: Path = typer.Option(..., "--out", help="Output directory (new or empty)."),
    folder: Path = typer.Option(None, "--folder", help="Image-folder tree ROOT/<class>/*.jpg (labelled by folder)."),
    table: Path = typer.Option(None, "--table", help="CSV/TSV/JSONL/Parquet table: image path, caption."),
    holdout: int = typer.Option(0, "--holdout", help="Samples held out in OUT/eval (0 = none)."),
    image_size: str = typer.Option("none", "--image-size", help="'none' copies images; S re-encodes larger ones."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Samples per shard."),
    template: list[str] = typer.Option([], "--caption-template", help="Template, {} = class; repeatable."),
    image_column: str = typer.Option(None, "--image-column", help="Table column of image paths [image]."),
    caption_column: str = typer.Option(None, "--caption-column", help="Table column of captions [caption]."),
    label_column: str = typer.Option(None, "--label-column", help="Table column of class labels (optional)."),
    max_chars: int = typer.Option(1000, "--max-caption-chars", help="Longer captions are skipped."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample order, held-out draw and templates."),
    json_: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Users' images and captions as shards; bad samples skipped and listed in OUT/import_report.json."""
    from vltrain.data import importer as imp

    size, templates = imp.parse_image_size(image_size), tuple(template) or (imp.DEFAULT_TEMPLATE,)
    opts = imp.ImportOptions(holdout, size, shard_size, templates, max_chars, seed)
    cols = {"image_column": image_column, "caption_column": caption_column, "label_column": label_column}
    s = imp.import_data(out, folder, table, opts, **cols)
    stdout, stderr = imp.summary_lines(s)
    typer.echo(json.dumps(s, indent=2) if json_ else "\n".join(stdout))
    for line in stderr:
        typer.echo(line, err=True)


@tok_app.command("train")
def tokenizer_train(
    shards: Path = typer.Option(..., "--shards", help="Shards whose captions (KEY.txt) to train on."),
    vocab_size: int = typer.Option(..., "--vocab-size", help="Vocabulary size (the model's vocab_size)."),
    out: Path = typer.Option(..., "--out", help="Output .model file (written atomically)."),
    seed: int = typer.Option(0, "--seed", help="SentencePiece sampling seed."),
) -> None:
    """Train a SentencePiece BPE model with pad=0, unk=1, bos=2, eos=3, <mask>=4."""
    from vltrain.tokenizer import train_tokenizer_from_shards

    tok = train_tokenizer_from_shards(shards, vocab_size, out, seed=seed)
    typer.echo(f"wrote {out} ({tok.vocab_size} pieces)")


def main() -> None:
    app(prog_name="vltrain")


if __name__ == "__main__":  # python -m vltrain.cli (torchrun runs it this way)
    main()
