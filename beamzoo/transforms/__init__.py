"""beamzoo's operators. Importing this package registers them all by name
(``beamzoo.core.OPS``), so a graph read from JSON finds its steps."""
from beamzoo.transforms import flow, inference, io, postprocess, preprocess, sinks, sources  # noqa: F401
import beamzoo.resume  # noqa: F401,E402 - registers the resume steps
import beamzoo.serve.remote  # noqa: F401,E402 - registers the remote step (standard library only)
