"""The built-in digits world: its grammar and images (`world`), its concepts, its judges and its quality check.

The grammar's names are re-exported here (`from cad_ray.digits import DIGIT_WORDS`); judges and quality load
torch and the judge weights, so they are imported from their modules.
"""

from cad_ray.digits.world import *  # noqa: F401,F403
