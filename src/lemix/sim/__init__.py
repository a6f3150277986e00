"""Discrete-event executor for the LeMix scheduler."""
from lemix.sim.simulator import Simulator, simulate_policy

__all__ = ["Simulator", "simulate_policy"]
