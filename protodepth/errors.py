"""The errors a user's mistake or a broken input raises; `scripts/*` print them as one line, no traceback."""
from protodepth.checkpoint import CheckpointError
from protodepth.config import ConfigError
from protodepth.data.errors import DataError
from protodepth.model import WeightsError
from protodepth.train import NonFiniteError

USER_ERRORS = (ConfigError, CheckpointError, DataError, WeightsError, NonFiniteError)
