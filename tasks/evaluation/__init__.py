"""The `evaluate` flow's metric code, one module per thing it computes.

- `identity`: ArcSim / CurSim (Hungarian matching of frame faces to reference faces)
- `video_text`: ViCLIP-T and ViCLIP-V
- `dynamic`: VBench's dynamic degree on RAFT flow
- `two_tier`: the decoupled tier-1 face and tier-2 CLIP-T / CLIP-I / DINO-I scores on the middle frame
- `binding`: binding accuracy and swap rate (attributes on their own subject's person)
- `inputs`: pairing generated videos with benchmark cases; reading videos and reference images
- `runner`: one video through every metric of its task; `report`: Parquet, JSON and markdown outputs
"""
