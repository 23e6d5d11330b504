"""English text the synthetic models' tokenizer is trained on (a byte-level BPE, deterministic)."""

CORPUS = """\
hmoe runs large mixture of experts models on one workstation. Attention and the shared experts run on
the graphics card, the routed experts run on the processor, and the latent cache stays small.
The weights of this demo model are random numbers, so the words it writes are noise.
A good question deserves a clear answer. What would you like to talk about today?
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.
Memory bandwidth decides how fast a model can decode: every token reads every active weight once.
She opened the window, looked at the rain, and decided that the walk could wait until tomorrow.
Numbers, letters and signs: 0 1 2 3 4 5 6 7 8 9, a b c d e f g h i j k l m n o p q r s t u v w x y z.
Hello! How are you? I am fine, thank you. Please tell me more about your project and your machine.
The router picks a few experts for each token; their outputs are weighted and summed with the shared expert.
In the morning the market was busy with people buying bread, fruit, fish, cheese and fresh flowers.
Rules in a small file say which module goes to which device, and the plan shows the bytes before loading.
Once upon a time there was a small town by the sea where every house had a blue door and a red roof.
Long prompts are computed in large batches; short replies are computed one token at a time.
The library closes at six in the evening, but the reading room stays open for students until nine.
Thank you for trying this program. Type a message and press enter; type /exit to leave the chat.
"""
