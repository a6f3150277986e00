"""Discrete-event executor for the LeMix scheduler."""
from lemix.sim.simulator import DEFAULT_NOISE, OpExecutor, Simulator, simulate_policy

__all__ = ["DEFAULT_NOISE", "OpExecutor", "Simulator", "simulate_policy"]
