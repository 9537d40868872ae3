"""The one entrypoint: compose ``conf/`` with Hydra, then run the task the config names.

python run.py                       # GRPO quickstart: SmolLM2-135M-Instruct on the bundled QA (CPU)
python run.py service=embedding     # serve; see conf/config.yaml for the groups
python run.py --help                # every group and option
"""

import hydra
from omegaconf import DictConfig

from core.tasks import run_task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    return run_task(cfg)


if __name__ == "__main__":
    main()
