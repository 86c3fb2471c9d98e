#include "ferry/vmstate.h"

struct tc_dev {
	uint32_t a;
	uint16_t b;
};

#ifdef GOOD
#define TC_B FERRY_VMS_U16(struct tc_dev, b)
#else
#define TC_B FERRY_VMS_U32(struct tc_dev, b)
#endif

static const struct ferry_vms_field tc_fields[] = {
	FERRY_VMS_U32(struct tc_dev, a),
	TC_B,
	FERRY_VMS_END_OF_LIST
};

const struct ferry_vmsd tc_vmsd;
const struct ferry_vmsd tc_vmsd = {
	.name = "tc",
	.version = 1,
	.minimum_version = 1,
	.fields = tc_fields,
};
