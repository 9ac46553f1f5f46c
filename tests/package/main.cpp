// Uses the installed headers and libraries: the host-only core always, the layer's API when the GPU
// library was built (only linked and inspected here: this test runs on machines without a GPU).
#include <cstdio>

#include "megamoe/layout.h"
#include "megamoe/shape.h"
#ifdef HAVE_MEGAMOE_GPU
#include "megamoe/layer.h"
#endif

int main() {
  const megamoe::MoeShape shape = megamoe::make_preset("dsv4-flash", 4, 4096);
  const megamoe::WorkspaceLayout layout(shape);
  std::printf("%s: workspace %zu bytes\n", megamoe::describe(shape).c_str(), layout.total_bytes());
#ifdef HAVE_MEGAMOE_GPU
  // Taking the address links the shared library's symbol.
  void (megamoe::Layer::*check)() = &megamoe::Layer::check_errors;
  std::printf("layer API linked: %s\n", check ? "yes" : "no");
#endif
  return layout.total_bytes() > 0 ? 0 : 1;
}
