"""The benchmark suite: ``python -m benchmarks`` (see ``--help``).

Layout: ``workloads`` describes each graph as plain data; ``runners`` executes
such a graph with one engine (flowing, the floors, the peers); ``_case`` is the
child process that times one runner on one case; ``run`` alternates runners
over fresh children and prints the table of ratios.
"""
