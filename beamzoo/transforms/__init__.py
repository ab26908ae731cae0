"""beamzoo's operators. Importing this package registers them all by name
(``beamzoo.core.OPS``), so a graph read from JSON finds its steps."""
from beamzoo.transforms import flow, inference, io, ocr, postprocess, preprocess, sinks, sources  # noqa: F401
import beamzoo.resume  # noqa: F401,E402 - registers the resume steps
import beamzoo.serve.remote  # noqa: F401,E402 - registers the remote step (standard library only)
import beamzoo.policies  # noqa: F401,E402 - the deadline steps
import beamzoo.gates  # noqa: F401,E402 - the gate step
import beamzoo.cascade  # noqa: F401,E402 - the escalate step
