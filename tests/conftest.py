import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import settings

# First calls pay torch's lazy initialization; timing deadlines would make property tests flaky.
settings.register_profile("bayesq", deadline=None, max_examples=60)
settings.load_profile("bayesq")
