"""Test-suite configuration.

The property tests (hypothesis) run on a fixed set of examples by default, so that a
run of the suite is reproducible. ``pytest --hypothesis-profile=explore`` draws fresh
random examples on each run, to search for new failures.
"""

from hypothesis import settings

settings.register_profile("default", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile("default")
