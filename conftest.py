"""pytest configuration: hypothesis profiles.

    HYPOTHESIS_PROFILE=ci  (default) deterministic and quick, what CI runs
    HYPOTHESIS_PROFILE=dev many more random examples, for a local run before a change lands
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
