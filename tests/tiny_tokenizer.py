"""A small byte-level BPE tokenizer trained at test time on the few lines of code below, so that the tiny
random models need nothing installed: no model, no download. Byte-level like SmolLM2's (any text round-trips
through decode), with the same three special tokens at ids 0-2 and merges for indentation runs, which the
token-healing tests rely on."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024

CORPUS = '''\
import os
import sys
import json
import math
import time
import random
from collections import defaultdict, Counter
from pathlib import Path


def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(x, y):
    return x * y


def average(xs):
    total = sum(xs)
    return total / len(xs)


def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

    def __len__(self):
        return len(self.items)


class Person:
    def __init__(self, name, age):
        self.name = name
        self.age = age

    def greet(self):
        print(f"hello {self.name}")


def read_lines(path):
    with open(path) as f:
        data = f.read()
    return data.split("\\n")


def count_words(text):
    counts = Counter()
    for word in text.split():
        counts[word.lower()] += 1
    return counts


def walk(root):
    for root, dirs, files in os.walk(root):
        for name in files:
            print(os.path.join(root, name))


def main(args):
    if len(args) < 2:
        print("usage: main.py FILE")
        sys.exit(1)
    names = ['b', 'a', 'c']
    names_sorted = sorted(names)
    a = [1, 2, 3, 4, 5]
    a.reverse()
    x = list(range(10))
    x.sort()
    y = {k: v for k, v in zip(names, a)}
    for i in range(len(x)):
        if x[i] % 2 == 0:
            continue
        elif x[i] > 5:
            break
        else:
            y[i] = x[i] * 2
    result = json.dumps(y, indent=2)
    value = math.sqrt(random.random())
    start = time.time()
    print(result, value, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
'''


def train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The same tokenizer on every run: training on a fixed text is deterministic."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
