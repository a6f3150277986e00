"""Built-in placement policies; importing this package registers them all."""
from lemix.sched.policies import baselines, lemix, separate  # noqa: F401
