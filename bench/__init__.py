"""`make bench`: the product's speed, reaction times and scale, each compared with a baseline in the same run."""
