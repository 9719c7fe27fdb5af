"""Ray Tune sweeps over memory size x forget threshold, the pictures, and the champion."""
