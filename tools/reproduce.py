"""The README's main job: run the reproduction sweep. Wired to nbs/reproduce.ipynb by the experiments work."""
import sys

sys.exit("make reproduce: the reproduction sweep is not wired yet (see the open experiments issue)")
