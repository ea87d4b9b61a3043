"""Interception: the function mode and the autograd/optimizer hooks. Private."""
