"""The ``tierlift`` command line.

Subcommands: ``train``, ``launch``, ``config show|convert``, ``data prepare``,
``export``.  Each handler imports what it needs when it runs, so ``tierlift
--help`` and usage errors cost no torch/Ray import.

Errors: a :class:`TierliftError` (bad input or environment) prints one line
``tierlift: error: <setting=value: message Fix: ...>`` and exits 2, with the
traceback only under ``--debug`` (accepted before or after the subcommand);
argparse usage errors exit 2; Ctrl-C exits 130.  Any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from tierlift.errors import ConfigError, LaunchError, TierliftError

__all__ = ["main", "build_parser"]


def _int_at_least(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is not in [{lo}, {hi if hi is not None else '...'}]")
        return v
    return parse


_PORT = _int_at_least(0, 65535)


# -- train ----------------------------------------------------------------------

def _has_checkpoint(run_dir: str) -> bool:
    from tierlift.runtime.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir) is not None


def _cmd_train(args: argparse.Namespace) -> int:
    from tierlift._configbase import from_dict
    from tierlift.runtime.config import TrainConfig, config_choices, resolve_batch_sizes

    cfg = TrainConfig.load(args.config)
    chosen = config_choices(cfg)  # values tierlift chose for DeepSpeed "auto" / missing keys
    data = cfg.to_dict()
    run = data["run"]
    for key, value in (("nproc", args.nproc), ("backend", args.backend), ("device", args.device),
                       ("master_port", args.master_port)):
        if value is not None:
            run[key] = value
    run["dir"] = os.path.abspath(args.run_dir or run["dir"])
    if args.steps is not None:
        data["train"]["max_steps"] = args.steps
    for item in args.set or []:
        _apply_set(data, item)
    cfg = from_dict(TrainConfig, data)  # re-validated with the overrides applied
    if cfg.run.backend != "mpi":  # the world size is --nproc: batch sizes derived from it are fixed here
        cfg, lines = resolve_batch_sizes(cfg, cfg.run.nproc)
        chosen += lines
    for line in chosen:
        print(f"tierlift: {line}", file=sys.stderr)
    run_dir = cfg.run.dir
    if args.resume and not _has_checkpoint(run_dir):
        raise LaunchError("has no complete checkpoint to resume from.", setting="--resume", value=run_dir,
                          fix="drop --resume to start fresh, or give the --run-dir of the run to continue.")
    if not args.resume and _has_checkpoint(run_dir):
        # A fresh run would interleave its checkpoints and metrics with the old run's.
        raise LaunchError("already holds checkpoints of an earlier run.", setting="--run-dir", value=run_dir,
                          fix="add --resume to continue it, or give a new --run-dir.")
    from tierlift.runtime.outdir import ensure_writable_dir

    ensure_writable_dir(run_dir, setting="--run-dir" if args.run_dir else "run.dir", error=ConfigError)
    # config.yaml is written by rank 0 once the run is accepted (entry.run_training):
    # a refused --resume must leave the run directory as it was.
    port_setting = "--master-port" if args.master_port is not None else "run.master_port"
    n, backend = cfg.run.nproc, cfg.run.backend
    if backend == "local" and n == 1:
        from tierlift.runtime.entry import run_training

        os.environ["TIERLIFT_RUN_DIR"] = run_dir
        run_training(cfg.to_dict(), run_dir, resume=args.resume, max_steps=args.steps)
        return _report_done(0, run_dir)
    if backend == "local":
        from tierlift.launch.local import launch_local

        cmd = [sys.executable, "-m", "tierlift.launch.worker", "--run-dir", run_dir]
        cmd += ["--resume"] if args.resume else []
        cmd += ["--max-steps", str(args.steps)] if args.steps is not None else []
        cmd += ["--debug"] if args.debug else []
        from tierlift.launch.worker import PEER_LOST_EXIT, RUN_CONFIG_ENV

        return _report_done(launch_local(cmd, n, log_dir=os.path.join(run_dir, "logs"),
                                         master_port=cfg.run.master_port, run_dir=run_dir,
                                         port_setting=port_setting,
                                         env_extra={RUN_CONFIG_ENV: cfg.to_yaml()},
                                         peer_lost_code=PEER_LOST_EXIT), run_dir)
    if backend == "mpi":  # this process is one rank that mpiexec/srun started
        from tierlift.launch.mpi import train_mpi

        return train_mpi(cfg, report=_report_done, resume=args.resume, max_steps=args.steps,
                         nnodes=args.nnodes, port_setting=port_setting)
    from tierlift.launch.ray_launcher import launch_ray

    rc = launch_ray(nproc=n, run_dir=run_dir, target="tierlift.runtime.entry:run_training",
                      kwargs={"cfg_dict": cfg.to_dict(), "run_dir": run_dir, "resume": args.resume,
                              "max_steps": args.steps},
                      device=cfg.run.device, name=os.path.basename(run_dir.rstrip(os.sep)) or "tierlift",
                      master_port=cfg.run.master_port, port_setting=port_setting,
                      threads_per_rank=cfg.run.threads_per_rank, debug=args.debug)
    return _report_done(rc, run_dir)


def _report_done(rc: int, run_dir: str) -> int:
    """One closing line from the run's summary.json (written by rank 0)."""
    import json

    path = os.path.join(run_dir, "summary.json")
    if rc == 0 and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
        if s.get("losses"):
            print(f"tierlift: trained to step {s['start_step'] + s['steps']} on {s['world_size']} rank(s): "
                  f"loss {s['losses'][0]:.4f} -> {s['losses'][-1]:.4f}, {s['tokens_per_s']:,.0f} tokens/s; "
                  f"run dir {run_dir}", file=sys.stderr)
    return rc


def _apply_set(data: dict, item: str) -> None:
    """``--set a.b.c=VALUE``: VALUE is read as YAML (numbers, booleans, lists, mappings)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise LaunchError("must look like SECTION.KEY=VALUE.", setting="--set", value=item,
                          fix="e.g. --set train.micro_batch_size=4 or --set offload.optimizer='{kind: cpu}'.")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise LaunchError(f"the value is not valid YAML ({exc}).", setting="--set", value=item,
                          fix="quote the value for the shell, e.g. --set 'offload.optimizer={kind: cpu}'.") from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            raise LaunchError(f"{part!r} is not a config section.", setting="--set", value=item,
                              fix="name a key inside a section, e.g. train.max_steps=100 "
                                  "(see `tierlift config show CONFIG`).")
        node = child
    node[parts[-1]] = value  # unknown keys are caught when the config is re-validated


# -- launch ---------------------------------------------------------------------

def _cmd_launch(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if not cmd:
        raise LaunchError("no command given.", setting="command", value=None,
                          fix="put the command after --, e.g. tierlift launch --nproc 2 -- python train.py.")
    run_dir = os.path.abspath(args.run_dir) if args.run_dir else None
    if args.backend == "local":
        from tierlift.launch.local import launch_local

        return launch_local(cmd, args.nproc, master_port=args.master_port, run_dir=run_dir,
                            log_dir=os.path.join(run_dir, "logs") if run_dir else None)
    from tierlift.launch.ray_launcher import launch_ray

    return launch_ray(nproc=args.nproc, cmd=cmd, run_dir=run_dir, device=args.device, master_port=args.master_port,
                      debug=args.debug)


# -- config, data, export -------------------------------------------------------

def _cmd_config_show(args: argparse.Namespace) -> int:
    from tierlift.runtime.config import TrainConfig, render_config, require_batch_sizes, resolve_batch_sizes

    # The header lists the values chosen for DeepSpeed "auto" / missing keys.
    cfg = TrainConfig.load(args.file, world_size=args.world_size)
    if args.world_size is None:
        require_batch_sizes(cfg, "`tierlift config show` without --world-size")
    else:
        cfg, lines = resolve_batch_sizes(cfg, args.world_size)  # a tierlift YAML's derived sizes
        for line in lines:
            print(f"tierlift: {line}", file=sys.stderr)
    sys.stdout.write(render_config(cfg))
    return 0


def _cmd_config_convert(args: argparse.Namespace) -> int:
    from tierlift.runtime.deepspeed_convert import convert_file

    text = convert_file(args.file, args.out, overwrite=args.overwrite, world_size=args.world_size)
    if args.out is None:
        sys.stdout.write(text)
    else:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from tierlift.runtime.data.prepare import prepare_cli

    return prepare_cli(args.inputs, args.out, args.tokenizer, args.shard_tokens, args.eval_fraction, args.overwrite)


def _cmd_export(args: argparse.Namespace) -> int:
    from tierlift.runtime.export import export_safetensors, export_source

    hf_config = None
    if args.hf_config:  # a model the run's config.yaml does not describe (a Trainer-API run of a user's HF model)
        from tierlift.errors import ConfigError
        from tierlift.models.config import ModelConfig
        from tierlift.models.hf import load_hf_config
        try:
            hf_config = load_hf_config(ModelConfig(kind="hf", hf_path=args.hf_config))
        except ConfigError as e:
            raise ConfigError(e.message, setting="--hf-config", value=args.hf_config,
                              fix="name a local directory holding the trained model's Hugging Face config.json "
                                  "(e.g. one written by model.config.save_pretrained(DIR)).") from None
    ckpt, step = export_source(args.path)  # export exactly this one, even if a newer one lands meanwhile
    files = export_safetensors(ckpt, args.out, dtype=args.dtype, show_progress=sys.stderr.isatty(),
                               overwrite=args.overwrite, hf_config=hf_config)
    print(f"exported step {step if step is not None else '?'} ({ckpt}): wrote {len(files)} file(s) to {args.out}")
    return 0


# -- parser ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # --debug lives on every parser; SUPPRESS keeps a subparser from resetting
    # a --debug given before the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks for errors")
    p = argparse.ArgumentParser(prog="tierlift", parents=[common],
                                description="Train models larger than GPU memory: ZeRO sharding tiered across "
                                            "GPU, pinned host memory and NVMe.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", parents=[common], help="train from a config (YAML or DeepSpeed JSON)")
    t.add_argument("config", metavar="CONFIG", help="tierlift YAML or DeepSpeed JSON")
    t.add_argument("--nproc", type=_int_at_least(1), help="ranks (overrides run.nproc)")
    t.add_argument("--backend", choices=["ray", "local", "mpi"],
                   help="launcher (overrides run.backend); mpi: this process is one rank that "
                        "mpiexec/mpirun/srun --mpi=pmi2 started")
    t.add_argument("--nnodes", type=_int_at_least(1),
                   help="mpi: nodes the launch must span (checked; must divide the ranks evenly)")
    t.add_argument("--steps", type=_int_at_least(1), help="optimizer steps (overrides train.max_steps)")
    t.add_argument("--run-dir", help="run directory (overrides run.dir)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides run.device")
    t.add_argument("--master-port", type=_PORT, help="rendezvous port, 0 = free one (overrides run.master_port)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, value read as YAML (repeatable), "
                        "e.g. --set 'offload.optimizer={kind: nvme, path: /tmp/nv}'")
    t.set_defaults(handler=_cmd_train)

    la = sub.add_parser("launch", parents=[common], help="run a command on N ranks with torchrun's environment",
                        usage="tierlift launch [--nproc N] [--backend {ray,local}] [--master-port P] "
                              "[--run-dir DIR] [--device {auto,cpu,cuda}] -- CMD...")
    la.add_argument("--nproc", type=_int_at_least(1), default=1, help="ranks (default 1)")
    la.add_argument("--backend", choices=["ray", "local"], default="ray", help="launcher (default ray)")
    la.add_argument("--master-port", type=_PORT, default=0, help="the command's MASTER_PORT (0 = a free one)")
    la.add_argument("--run-dir", help="write logs/rank-N.log (and Ray's files) here")
    la.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="ray backend: reserve one GPU per rank when cuda (auto: when one is visible)")
    la.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command, after --")
    la.set_defaults(handler=_cmd_launch)

    c = sub.add_parser("config", parents=[common], help="show or convert configs")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cs = csub.add_parser("show", parents=[common], help="print the resolved config with every default")
    cs.add_argument("file", metavar="FILE")
    cs.add_argument("--world-size", type=_int_at_least(1),
                    help="ranks the config will train on: fixes batch sizes derived from a DeepSpeed "
                         "train_batch_size")
    cs.set_defaults(handler=_cmd_config_show)
    cc = csub.add_parser("convert", parents=[common], help="convert a DeepSpeed JSON config to tierlift YAML")
    cc.add_argument("file", metavar="DS_JSON")
    cc.add_argument("--out", help="write here instead of stdout")
    cc.add_argument("--overwrite", action="store_true")
    cc.add_argument("--world-size", type=_int_at_least(1),
                    help="ranks the config will train on: fixes batch sizes derived from train_batch_size")
    cc.set_defaults(handler=_cmd_config_convert)

    d = sub.add_parser("data", parents=[common], help="prepare datasets")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dp = dsub.add_parser("prepare", parents=[common], help="tokenize text files into Parquet token shards")
    dp.add_argument("inputs", nargs="+", metavar="TEXT", help=".txt/.md/.jsonl files or directories")
    dp.add_argument("--out", required=True, help="output directory (new or empty)")
    dp.add_argument("--tokenizer", default="byte", help="'byte' or a local tokenizer.json")
    dp.add_argument("--shard-tokens", type=_int_at_least(1), default=1 << 24, help="tokens per shard file")
    dp.add_argument("--eval-fraction", type=float, default=0.0, help="share of documents held out for eval")
    dp.add_argument("--overwrite", action="store_true")
    dp.set_defaults(handler=_cmd_data_prepare)

    e = sub.add_parser("export", parents=[common], help="export a checkpoint's weights as safetensors")
    e.add_argument("path", metavar="RUN_OR_CKPT", help="a run dir (newest checkpoint) or one checkpoint dir")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--hf-config", metavar="DIR", default=None,
                   help="a local dir with the Hugging Face config.json of the trained model (for runs whose "
                        "config.yaml does not name it, e.g. a Trainer-API run of your own HF model): the export "
                        "then loads with from_pretrained")
    e.set_defaults(handler=_cmd_export)

    # Node and planning commands live in their own modules (tierlift/launch/cmd_*.py);
    # each adds its subparser with `register(subparsers, common)`.
    from tierlift.launch import cmd_doctor, cmd_plan, cmd_render, cmd_report
    for mod in (cmd_plan, cmd_doctor, cmd_report, cmd_render):
        mod.register(sub, common)
    return p


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """For ``launch``: the tierlift options before ``--`` and the command after it.

    Done by hand because argparse's handling of "--" with REMAINDER differs
    between Python versions (3.11 here, 3.12 on the GPU machines)."""
    words = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if words and argv[words[0]] == "launch" and "--" in argv[words[0]:]:
        i = argv.index("--", words[0])
        return argv[:i], argv[i + 1:]
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, cmd = _split_command(argv)
    try:
        args = build_parser().parse_args(head)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    debug = args.debug = getattr(args, "debug", False)
    if cmd is not None:
        if args.cmd:
            print("tierlift: error: give the command either after -- or without it, not both.", file=sys.stderr)
            return 2
        args.cmd = cmd
    try:
        return int(args.handler(args) or 0)
    except TierliftError as exc:
        if debug:
            import traceback
            traceback.print_exc()
        print(f"tierlift: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tierlift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
