"""Analyses that train ladders or read sweep directories and plot: the coordinate check, transfer fitting, the
drift of optima along a scaling axis and the end-to-end regret. The library below never imports them."""
