"""retain: continual learning that is correct, fast and honest about forgetting."""

__version__ = "0.1.0"

from retain.api import Result, RunConfig, resolve, run  # noqa: E402
from retain.method import Compose, Method, create, methods, register  # noqa: E402

__all__ = ["Compose", "Method", "Result", "RunConfig", "create", "methods", "register", "resolve", "run",
           "__version__"]
