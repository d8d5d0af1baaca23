"""QueryDiff model core: configs, the student model, checkpoints, inference. Imports neither train nor export."""
from qd_core.config import Config, ConfigError, load_config
from qd_core.model import QueryDiffStudent, StudentOutput, build_student

__all__ = ["Config", "ConfigError", "load_config", "build_student", "QueryDiffStudent", "StudentOutput"]
