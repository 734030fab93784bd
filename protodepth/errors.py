"""The errors a user's mistake or a broken input raises; `scripts/*` print them as one line, no traceback."""
from protodepth.checkpoint import CheckpointError
from protodepth.config import ConfigError
from protodepth.data.synthia import BadFrameError
from protodepth.model import WeightsError
from protodepth.train import DataSetupError, NonFiniteError

USER_ERRORS = (ConfigError, CheckpointError, BadFrameError, DataSetupError, WeightsError, NonFiniteError)


def one_line(e: BaseException) -> str:
    """The message of a user error; an error re-raised from a DataLoader worker carries the worker's traceback
    in its message, of which the last line is the original message."""
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    if len(lines) > 1 and "Traceback" in str(e):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)
