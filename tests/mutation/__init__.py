"""Mutation testing (`make mutate`): the runner, its pytest plugin and the allow-list."""
