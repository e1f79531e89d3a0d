"""When a power-cut test cuts: instants spread over work whose length is not known."""

import math


def log_uniform(rng, low, high):
    """A delay between low and high whose logarithm is uniform: every tenfold span of delays
    (10-100 ms, 0.1-1 s, ...) gets the same share of cuts."""
    return math.exp(rng.uniform(math.log(low), math.log(high)))
