"""The foundation every part may use: one-line user errors, atomic files, locks and stop signals, progress lines,
and the torch-free constants shared by the settings, the data and the math."""
