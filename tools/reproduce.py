"""The README's main job: execute nbs/reproduce.ipynb for a profile with papermill.

    python tools/reproduce.py --profile cpu [--jobs N] [--threads 1] [--set key=value ...] [--results-dir DIR]

`--set key=value` (repeatable; the Makefile's SET="k=v k=v") wins over the profile's settings, e.g. a local copy of
the paper's model: `--set model=/models/Qwen2.5-1.5B-Instruct`; see motg.experiment.override_profile. With
overrides the results go to results/<profile>-set-<hash>/ unless --results-dir says otherwise.

Results land in results/<profile>/ (runs, tidy data, tables, figures, manifest.json); the executed notebook is
written to results/<profile>/reproduce.ipynb (papermill never writes over its input). Completed runs are
skipped, so an interrupted reproduction resumes and a second call finishes in seconds.
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", help="a profile in profiles/ (smoke, cpu, cpu-full, gpu, paper)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs executed at the same time (default: one per GPU on CUDA, else 2 for two cores)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a parameter that wins over the profile (repeatable), e.g. model=/models/qwen seed=0")
    parser.add_argument("--results-dir", default=None, help="where results go (default: results/<profile>)")
    parser.add_argument("--no-reuse", action="store_true",
                        help="run every run here, even one whose configuration completed in another results folder "
                             "beside this one (default: such a run is copied)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from motg.experiment import load_profile, override_profile, parse_override, results_name
    try:
        spec = load_profile(args.profile)  # an unknown profile fails here, before any work
    except ValueError as error:
        sys.exit(f"--profile: {str(error).split(': ', 1)[-1]}")
    try:  # a misspelt or malformed override too
        overrides = dict(parse_override(text) for text in args.overrides)
        spec = override_profile(spec, overrides)
    except ValueError as error:
        sys.exit(f"--{error}")
    if (args.jobs is not None and args.jobs < 1) or args.threads < 1:
        sys.exit("--jobs and --threads: must be integers >= 1")
    if args.jobs is None:
        import torch
        args.jobs = torch.cuda.device_count() if torch.cuda.is_available() else 2  # one run per GPU
    import papermill as pm
    out = Path(args.results_dir).resolve() if args.results_dir else ROOT / "results" / results_name(spec, args.profile)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    pm.execute_notebook(str(ROOT / "nbs" / "reproduce.ipynb"), str(out / "reproduce.ipynb"),
                        parameters={"profile": args.profile, "jobs": args.jobs, "threads": args.threads,
                                    "overrides": overrides, "results_dir": str(out) if args.results_dir else None,
                                    "reuse": not args.no_reuse},
                        cwd=str(ROOT / "nbs"), progress_bar=False, log_output=True)
    print(f"reproduce --profile {args.profile}: done in {time.time() - started:.0f} s; see {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
