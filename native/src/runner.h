// The qd_infer pipeline: list → decode → batch → run → write, with latency statistics.
#pragma once

#include "args.h"

namespace qd {

// Runs the whole command and returns the exit status: kExitOk when every image was written, kExitFailure when
// some image could not be read or written (the others are still written, one error line per failed image).
// Throws (ModelError, FolderError, ...) for problems that stop the run before or while the model runs.
int run_infer(const Options& options);

}  // namespace qd
