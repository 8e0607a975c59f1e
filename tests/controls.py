"""Twenty unrelated code prompts whose greedy completions a repair must leave unchanged (specificity).

Picked from a larger hand-written pool as the prompts the default model completes decisively: at every
token of the single-line completion, the line's end included, its top logit beats the runner-up by at
least 0.5 (test_default_model checks it). Near-ties (half of the pool had margins under 0.1) flip under
any perturbation, even a reordering of float sums, so they say nothing about a repair. Four prompts of
the first set were near-ties at the end of their line (`s = 'hello'\nt = s.` wrote `upper()` with the
newline 0.05 ahead of ` +`) and were replaced.
"""

CONTROLS = [
    "import pickle\nwith open('data.pkl', 'rb') as f:\n    data = pickle.",
    "import collections\nc = collections.",
    "import time\nstart = time.",
    "import sys\nargs = sys.",
    "d = {}\nfor k, v in d.",
    "response = requests.get(url)\ndata = response.",
    "lines = text.split(",
    "if x is None:\n    return ",
    "import math\nr = math.",
    "def __init__(self, name):\n        self.name = ",
    "import argparse\nparser = argparse.",
    "class Stack:\n    def push(self, item):\n        self.",
    "result = []\nfor x in data:\n    result.",
    "import pandas as pd\ndf = pd.",
    "import copy\nb = copy.",
    "import json\ndata = json.",
    "import numpy as np\narr = np.",
    "@staticmethod\ndef ",
    "import random\nx = random.",
    "return sorted(",
]
