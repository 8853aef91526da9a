"""The task seam (DESIGN.md section 3); the seam itself arrives with the text-classification issue."""
