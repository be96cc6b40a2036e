"""Label degradations: `masks` (SNOW's noise on segmentation masks: removed objects, bounding
boxes, deformed and simplified contours) and `classes` (class flips by a transition matrix)."""
