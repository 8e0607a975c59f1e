"""Twenty unrelated code prompts whose greedy completions a repair must leave unchanged (specificity).

Picked from a larger hand-written pool as the prompts the default model completes decisively: at every
token of the single-line completion its top logit beats the runner-up by at least 0.5. Near-ties (half
of the pool had margins under 0.1) flip under any perturbation, even a reordering of float sums, so
they say nothing about a repair.
"""

CONTROLS = [
    "import pickle\nwith open('data.pkl', 'rb') as f:\n    data = pickle.",
    "from collections import ",
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
    "print(len(",
    "import pandas as pd\ndf = pd.",
    "s = 'hello'\nt = s.",
    "words = sentence.",
    "import numpy as np\narr = np.",
    "@staticmethod\ndef ",
    "import random\nx = random.",
    "return sorted(",
]
