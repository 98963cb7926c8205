/*
 * edgeq's ABI bridge between ExecuTorch's QNN backend and a newer QNN HTP library.
 *
 * ExecuTorch 1.5.1 is compiled against the QNN 2.37 headers. The HTP library
 * shipped in the onnxruntime-qnn wheel is QNN 2.51, whose HTP device custom
 * config (QnnHtpDevice_CustomConfig_t) gained 8-byte-aligned members: its union
 * moved from byte offset 4 to byte offset 8 after the 4-byte option. ExecuTorch
 * writes the SoC id (57 for SM8650) at offset 4, QNN 2.51 reads offset 8 and
 * refuses the device ("unknown custom config socModel 0", error 14001).
 *
 * This library stands in for libQnnHtp.so: it loads the real library (linked
 * beside it as libQnnHtpReal.so), forwards QnnInterface_getProviders, and in
 * the provider table replaces deviceCreate with a wrapper that hands the real
 * deviceCreate copies of the HTP custom configs in the 2.51 layout. Nothing
 * else is touched. The layouts come from the public QNN headers:
 *   QnnInterface_t: uint32 backendId; const char* providerName;
 *                   Qnn_ApiVersion_t apiVersion (2 x 3 uint32); union { function table }
 *                   -> the table starts at byte 40
 *   the table's 41st entry (index 40) is deviceCreate (append-only across QNN 2.x)
 *   QnnDevice_Config_t: uint32 option (CUSTOM = 0); union { void* customConfig; ... } at byte 8
 * edgeq's tests lower and run a program through this bridge, so a layout change
 * in a later wheel fails a test rather than a user's build.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef uint64_t Qnn_ErrorHandle_t;
typedef Qnn_ErrorHandle_t (*GetProvidersFn)(const void ***, uint32_t *);
typedef Qnn_ErrorHandle_t (*DeviceCreateFn)(void *, const void **, void **);

#define TABLE_OFFSET 40
#define DEVICE_CREATE_INDEX 40
#define DEVICE_CONFIG_OPTION_CUSTOM 0u
/* Old custom config: option at 0, union at 4 (at most 8 bytes for the options ExecuTorch sets). */
#define OLD_UNION_OFFSET 4
#define NEW_UNION_OFFSET 8
#define UNION_BYTES 8
#define ERROR_BRIDGE 1u

static void *real_library;
static DeviceCreateFn real_device_create;

static Qnn_ErrorHandle_t bridged_device_create(void *logger, const void **configs, void **device) {
  if (configs == NULL) return real_device_create(logger, configs, device);
  size_t count = 0;
  while (configs[count] != NULL) count++;
  /* One block per config: a 16-byte QnnDevice_Config_t, then a 64-byte new-layout custom config. */
  const void **fixed = calloc(count + 1, sizeof(void *));
  unsigned char *blocks = calloc(count ? count : 1, 16 + 64);
  if (fixed == NULL || blocks == NULL) {
    free(fixed);
    free(blocks);
    return ERROR_BRIDGE;
  }
  for (size_t i = 0; i < count; i++) {
    const unsigned char *config = configs[i];
    unsigned char *device_config = blocks + i * (16 + 64);
    memcpy(device_config, config, 16);
    uint32_t option;
    memcpy(&option, config, sizeof option);
    const unsigned char *custom = NULL;
    memcpy(&custom, config + 8, sizeof custom);
    if (option == DEVICE_CONFIG_OPTION_CUSTOM && custom != NULL) {
      unsigned char *moved = device_config + 16;
      memcpy(moved, custom, 4);
      memcpy(moved + NEW_UNION_OFFSET, custom + OLD_UNION_OFFSET, UNION_BYTES);
      memcpy(device_config + 8, &moved, sizeof moved);
    }
    fixed[i] = device_config;
  }
  Qnn_ErrorHandle_t status = real_device_create(logger, fixed, device);
  free(fixed);
  free(blocks);
  return status;
}

static int load_real_library(void) {
  if (real_library != NULL) return 0;
  Dl_info self;
  if (!dladdr((void *)bridged_device_create, &self) || self.dli_fname == NULL) return -1;
  char path[4096];
  snprintf(path, sizeof path, "%s", self.dli_fname);
  char *slash = strrchr(path, '/');
  if (slash == NULL) return -1;
  snprintf(slash + 1, sizeof path - (size_t)(slash + 1 - path), "libQnnHtpReal.so");
  real_library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (real_library == NULL) {
    fprintf(stderr, "edgeq qnn bridge: cannot load %s: %s\n", path, dlerror());
    return -1;
  }
  return 0;
}

Qnn_ErrorHandle_t QnnInterface_getProviders(const void ***providers, uint32_t *count) {
  if (load_real_library() != 0) return ERROR_BRIDGE;
  GetProvidersFn get = (GetProvidersFn)dlsym(real_library, "QnnInterface_getProviders");
  if (get == NULL) return ERROR_BRIDGE;
  Qnn_ErrorHandle_t status = get(providers, count);
  if (status != 0) return status;
  long page = sysconf(_SC_PAGESIZE);
  Dl_info real_info;
  if (!dladdr((void *)get, &real_info)) return ERROR_BRIDGE;
  for (uint32_t i = 0; i < *count; i++) {
    unsigned char *provider = (unsigned char *)(*providers)[i];
    DeviceCreateFn *slot = (DeviceCreateFn *)(provider + TABLE_OFFSET + DEVICE_CREATE_INDEX * sizeof(void *));
    /* Patch only the real library's own deviceCreate. A slot pointing elsewhere was already
       bridged, by this copy or by another copy of the bridge loaded from a second path (both
       are built with -z nodelete, so the pointer stays valid); bridging twice would move the
       config twice. */
    Dl_info slot_info;
    if (!dladdr((void *)*slot, &slot_info) || slot_info.dli_fbase != real_info.dli_fbase) continue;
    /* The table lives in the library's relocated read-only data. */
    uintptr_t start = (uintptr_t)slot & ~(uintptr_t)(page - 1);
    if (mprotect((void *)start, (size_t)page * 2, PROT_READ | PROT_WRITE) != 0) return ERROR_BRIDGE;
    real_device_create = *slot;
    *slot = bridged_device_create;
  }
  return status;
}
