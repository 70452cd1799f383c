import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the model recipes in models/

import models

SHARED = os.path.join(os.path.dirname(ROOT), "shared")

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def recipe():
    """recipe(name) -> (module, program with symbolic batch); built once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            module, inputs = models.build(name, batch=2)
            from tokencompile.compiler import export_module

            cache[name] = (module, export_module(module, inputs))
        return cache[name]
    return get


@pytest.fixture(scope="session")
def optimized(recipe):
    """optimized(name, budget) -> OptimizeResult; built once per session."""
    import tokencompile

    cache = {}

    def get(name, budget):
        if (name, budget) not in cache:
            cache[name, budget] = tokencompile.optimize(recipe(name)[1], budget=budget)
        return cache[name, budget]
    return get
