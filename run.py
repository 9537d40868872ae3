"""The one entrypoint: compose ``conf/`` with Hydra, then run the task the config names.

python run.py                       # GRPO quickstart: SmolLM2-135M-Instruct on the bundled QA (CPU)
python run.py service=embedding     # serve; see conf/config.yaml for the groups
python run.py --help                # every group and option
"""

import sys

import hydra
from omegaconf import DictConfig

from core.config_errors import JobFailed, config_error_in
from core.tasks import run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    try:
        return run_task(cfg)
    except Exception as exc:
        cause = config_error_in(exc)
        if cause is None:
            raise
        # A setting that cannot work, or a job that failed for a reason the message says in full:
        # a traceback would bury it.
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(1 if isinstance(cause, JobFailed) else 2)


if __name__ == "__main__":
    main()
