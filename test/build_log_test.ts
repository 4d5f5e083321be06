/**
 * What the bootstrap shows of a failed native build. The logs are CMake 3.25's and g++ 12's own
 * output for the two failures a CUDA torch without a complete toolkit used to hit (torch 2.14.1+cu130
 * in a venv at /venv, nvcc and the CUDA runtime only): TorchConfig.cmake refusing the toolkit, and
 * a CUDA header that the nvidia-* wheels do not carry.
 */
import assert from "node:assert/strict";
import { failureSummary } from "../native/build_log.ts";

const TORCH = "/venv/lib/python3.11/site-packages/torch";

const CONFIGURE_LOG = `-- The CXX compiler identification is GNU 12.2.0
-- Detecting CXX compiler ABI info
-- Detecting CXX compiler ABI info - done
-- Check for working CXX compiler: /usr/bin/c++ - skipped
-- Detecting CXX compile features
-- Detecting CXX compile features - done
-- Could NOT find CUDA (missing: CUDA_INCLUDE_DIRS CUDA_CUDART_LIBRARY) (found version "13.0")
CMake Warning at ${TORCH}/share/cmake/Caffe2/public/cuda.cmake:40 (message):
  PyTorch: CUDA cannot be found.  Depending on whether you are building
  PyTorch or a PyTorch dependent library, the next warning / error will give
  you more info.
Call Stack (most recent call first):
  ${TORCH}/share/cmake/Caffe2/Caffe2Config.cmake:84 (include)
  /usr/share/cmake-3.25/Modules/CMakeFindDependencyMacro.cmake:47 (find_package)
  ${TORCH}/share/cmake/Torch/TorchConfig.cmake:62 (find_dependency)
  CMakeLists.txt:35 (find_package)


CMake Error at ${TORCH}/share/cmake/Caffe2/Caffe2Config.cmake:88 (message):
  Your installed Caffe2 version uses CUDA but I cannot find the CUDA
  libraries.  Please set the proper CUDA prefixes and / or install CUDA.
Call Stack (most recent call first):
  /usr/share/cmake-3.25/Modules/CMakeFindDependencyMacro.cmake:47 (find_package)
  ${TORCH}/share/cmake/Torch/TorchConfig.cmake:62 (find_dependency)
  CMakeLists.txt:35 (find_package)


-- Configuring incomplete, errors occurred!
See also "/build/CMakeFiles/CMakeOutput.log".`.split("\n");

const COMPILE_LOG = `[ 33%] Building CXX object CMakeFiles/dipsy_torch.dir/src/shim.cpp.o
[ 66%] Building CXX object CMakeFiles/dipsy_torch.dir/src/ops.gen.cpp.o
In file included from /venv/lib/python3.11/site-packages/nvidia/cu13/include/cusparse.h:59,
                 from ${TORCH}/include/ATen/cuda/CUDAContextLight.h:10,
                 from ${TORCH}/include/ATen/cuda/CUDAContext.h:4,
                 from /src/native/src/shim.cpp:10:
/venv/lib/python3.11/site-packages/nvidia/cu13/include/cuda_fp16.h:4492:10: fatal error: nv/target: No such file or directory
 4492 | #include <nv/target>
      |          ^~~~~~~~~~~
compilation terminated.
gmake[2]: *** [CMakeFiles/dipsy_torch.dir/build.make:90: CMakeFiles/dipsy_torch.dir/src/shim.cpp.o] Error 1
gmake[2]: *** Waiting for unfinished jobs....
gmake[1]: *** [CMakeFiles/Makefile2:83: CMakeFiles/dipsy_torch.dir/all] Error 2
gmake: *** [Makefile:91: all] Error 2`.split("\n");

Deno.test("build log: a CMake error keeps the indented lines that give its reason", () => {
  assert.deepEqual(failureSummary(CONFIGURE_LOG), [
    `-- Could NOT find CUDA (missing: CUDA_INCLUDE_DIRS CUDA_CUDART_LIBRARY) (found version "13.0")`,
    `CMake Warning at ${TORCH}/share/cmake/Caffe2/public/cuda.cmake:40 (message):`,
    "  PyTorch: CUDA cannot be found.  Depending on whether you are building",
    "  PyTorch or a PyTorch dependent library, the next warning / error will give",
    "  you more info.",
    `CMake Error at ${TORCH}/share/cmake/Caffe2/Caffe2Config.cmake:88 (message):`,
    "  Your installed Caffe2 version uses CUDA but I cannot find the CUDA",
    "  libraries.  Please set the proper CUDA prefixes and / or install CUDA.",
  ]);
});

Deno.test("build log: with little room, CMake's errors win over its warnings", () => {
  const shown = failureSummary(CONFIGURE_LOG, 4);
  assert.equal(
    shown[0],
    `CMake Error at ${TORCH}/share/cmake/Caffe2/Caffe2Config.cmake:88 (message):`,
  );
  assert.equal(shown.length, 3);
});

Deno.test("build log: a compiler error names the project file that included the header", () => {
  assert.deepEqual(failureSummary(COMPILE_LOG), [
    COMPILE_LOG[6],
    "    (included from /src/native/src/shim.cpp:10)",
  ]);
});

Deno.test("build log: a message CMake gives without a body, and repeated errors, once each", () => {
  const log = [
    'CMake Error: The source directory "/nowhere" does not exist.',
    "Specify --help for usage, or press the help button on the CMake GUI.",
    "/src/a.cpp:3:1: error: 'x' does not name a type",
    "/src/a.cpp:3:1: error: 'x' does not name a type",
    "/usr/bin/ld: cannot find -ltorch_cuda: No such file or directory",
    "collect2: error: ld returned 1 exit status",
  ];
  assert.deepEqual(failureSummary(log), [log[0], log[2], log[4], log[5]]);
});

Deno.test("build log: nothing recognisable shows the log's tail", () => {
  const log = Array.from({ length: 50 }, (_, i) => `line ${i}`);
  assert.deepEqual(failureSummary(log), log.slice(-30));
});
