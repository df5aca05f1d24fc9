"""The shared kernel of wabridge: what the controller and the agent both rely on.

Nothing in here imports an adapter library (neonize, pystemd, Firestore, the Claude SDK) or
either side of the fleet; `import-linter` enforces that (see pyproject.toml).
"""

__version__ = "0.1.0"
